"""Tensor parallelism: one model over N processes (GPUs, or CPU processes for the tests), Megatron style.

Each of the N ranks holds 1/N of every large matrix and the whole of the small ones:

    wq, wk, wv   rows split by heads: n_heads / N query heads, n_kv_heads / N key/value heads each,
                 so each rank's attention is complete for its heads (GQA groups stay on one rank)
    w1, w3       rows split: hidden_dim / N of the SwiGLU's width
    wo, w2       columns split to match; each rank's product is a partial sum of the full one,
                 added up across ranks by one all-reduce (two per layer in all)
    output       rows split by vocabulary, and the N slices of the logits gathered
    norms, tok_embeddings   replicated (the embedding lookup reads one row per token)

The KV cache is split with the heads: each rank caches its own n_kv_heads / N heads.

The sharding is applied from outside `model.py`, which stays the single-device architecture: the
model is built on the meta device as usual, then `Shard.apply` shrinks its projections to this
rank's part and hooks the collectives onto the blocks' and the model's outputs; `load_model(shard=...)`
(loader.py) then reads only this rank's slices from the memory-mapped safetensors files
(`Shard.read`), so each rank's memory holds about 1/N of the weights. Both on-disk formats work:
Hugging Face's rotate-half permutation of wq/wk rows stays inside each head, so a slice of whole
heads is unpermuted like a smaller checkpoint. Quantized weights (quantize.py) are split the same
way, each rank quantizing its slices as it reads them or reading them from a quantized checkpoint:
int8's scales are per whole row (wo's and w2's taken over all ranks' columns), int4's groups must
not straddle two ranks' columns, so either gives what one process computes.

Launching (see `load_model` below and tp_replay.py for how the ranks then cooperate):

    torchrun --nproc-per-node 2 -m mistral.cli generate WEIGHTS --prompt "..."

Collectives go through torch.distributed: NCCL for CUDA devices (rank r uses cuda:LOCAL_RANK), gloo
on the CPU.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import hashlib
import logging
import os
import re
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .args import ModelArgs
from .errors import CheckpointError, MistralError
from .model import Linear, Transformer

log = logging.getLogger("mistral")

# How long one collective may wait for the other ranks before this rank gives up. A dead peer
# process is noticed at once (its sockets close); this bounds a peer that hangs.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
IDLE_TIMEOUT = datetime.timedelta(days=365)


class TensorParallelError(MistralError):
    """The ranks cannot work together: a bad N, different weights, a rank gone."""


def collective(fn, /, *args, **kwargs):
    """Run a torch.distributed collective. Its failure (a rank gone, a deadline passed: gloo and NCCL
    raise a plain RuntimeError) becomes a TensorParallelError, which no model error is mistaken for."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        reason = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        raise TensorParallelError(f"{fn.__name__} failed: {reason}") from e


# --- the collectives that join the ranks' parts ----------------------------------------------------
#
# Eagerly, they are torch.distributed's in-place collectives, whose failures `collective` names.
# Under torch.compile (the engine's compiled decode step, a follower's replay of it) they are the
# functional collectives, which dynamo traces into the graph as nodes of their own (a collective
# and a wait), so that the step stays one graph (a graph break at each collective would make it
# 2 x n_layers + 1 graphs, each with its own guards and Python call). A collective that fails there
# raises a plain RuntimeError; the eager rerun that follows it (Engine.decode_step, CompiledForward
# in tp_replay.py) fails at its first collective in turn, with the TensorParallelError that ends the rank.


def all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The sum of every rank's x."""
    if torch.compiler.is_compiling():
        return funcol.all_reduce(x, "sum", group or dist.group.WORLD)
    collective(dist.all_reduce, x, group=group)
    return x


def all_gather(x: torch.Tensor, group: dist.ProcessGroup | None, world: int) -> torch.Tensor:
    """Every rank's x [..., n], in rank order along the last dimension: [..., world * n]."""
    x = x.contiguous()
    if torch.compiler.is_compiling():
        return funcol.all_gather_tensor(x, x.dim() - 1, group or dist.group.WORLD)
    parts = [torch.empty_like(x) for _ in range(world)]
    collective(dist.all_gather, parts, x, group=group)
    return torch.cat(parts, dim=-1)


# --- which rows or columns this rank holds ----------------------------------------------------------

# A quantized layer's scales (quantize.py) are split with its weight: by rows, or, for wo and w2, by
# columns of the int4 groups; an int8 layer's per-row scales of wo and w2 are held whole.
_ROWS = tuple(f"{layer}.{tensor}" for layer in ("attention.wq", "attention.wk", "attention.wv", "feed_forward.w1",
                                                "feed_forward.w3", "output") for tensor in ("weight", "scales"))
_COLUMNS = tuple(f"{layer}.{tensor}" for layer in ("attention.wo", "feed_forward.w2") for tensor in ("weight", "scales"))


@dataclass(frozen=True)
class Shard:
    """Rank `rank`'s part of a model split `world` ways, and how to build and load it."""

    rank: int
    world: int
    group: dist.ProcessGroup | None = None  # the model's collectives; None: the default group
    control: dist.ProcessGroup | None = None  # gloo, no deadline: rank 0's step announcements (tp_replay.py)

    def check(self, args: ModelArgs) -> None:
        """Refuse a split that does not come out even (v0.3's 8 KV heads allow N = 1, 2, 4, 8)."""
        for name in ("n_kv_heads", "n_heads", "hidden_dim", "vocab_size"):
            value = getattr(args, name)
            if value % self.world:
                raise TensorParallelError(
                    f"tensor parallelism over {self.world} ranks needs {name} ({value}) to be divisible by "
                    f"{self.world}; this model splits over {_divisors(args)} ranks")

    def local_args(self, args: ModelArgs) -> ModelArgs:
        """The shape of one rank's part: its heads and its slice of the feed-forward (the residual
        width and the vocabulary, whose logits are gathered, stay whole)."""
        n = self.world
        return dataclasses.replace(args, n_heads=args.n_heads // n, n_kv_heads=args.n_kv_heads // n,
                                   hidden_dim=args.hidden_dim // n)

    def apply(self, model: Transformer) -> Transformer:
        """Shrink a model built on the meta device to this rank's part (before its weights are
        loaded): smaller projections, `model.args` describing the part (so that `new_cache`
        allocates this rank's KV heads only), and the collectives that join the parts.

        The collectives are forward hooks on the modules whose outputs are partial (each attention
        and feed-forward block: its wo or w2 covered this rank's slice of the inputs) or sliced (the
        model: its logits), not new linear layers: the projections stay whatever the loader makes
        them next, plain or quantized (quantize.py)."""
        args = model.args
        self.check(args)
        local = self.local_args(args)
        q, kv = local.n_heads * local.head_dim, local.n_kv_heads * local.head_dim
        with torch.device("meta"):
            for layer in model.layers:
                attention, ff = layer.attention, layer.feed_forward
                attention.n_heads, attention.n_kv_heads = local.n_heads, local.n_kv_heads
                attention.wq, attention.wk, attention.wv = Linear(args.dim, q), Linear(args.dim, kv), Linear(args.dim, kv)
                attention.wo = Linear(q, args.dim)
                ff.w1, ff.w3 = Linear(args.dim, local.hidden_dim), Linear(args.dim, local.hidden_dim)
                ff.w2 = Linear(local.hidden_dim, args.dim)
                for block in (attention, ff):  # [B, T, dim]: this rank's share of the sum
                    block.register_forward_hook(lambda module, inputs, out: all_reduce(out, self.group))
            model.output = Linear(args.dim, args.vocab_size // self.world)
        # [B, T, vocab_size / N]: the logits of this rank's slice of the vocabulary
        model.register_forward_hook(lambda module, inputs, logits: all_gather(logits, self.group, self.world))
        model.args = local
        model.use_ops(model.ops)  # the new modules take the model's operations
        return model

    def read(self, f, key: str, name: str, shape: tuple[int, ...], path: Path) -> torch.Tensor:
        """This rank's slice, of shape `shape`, of tensor `key` (checkpoint name `name`) from the open
        safetensors file `f`; only the slice's bytes are read from the memory map."""
        # Copies, not views of the mapped file: one view left would keep the whole mapping alive, and
        # with it every page a column slice touched (all of its tensor's); copied, each rank's memory
        # holds its slices and nothing more once the file is closed.
        dim = split_dim(name, len(shape))
        if dim is None:
            return f.get_tensor(key).clone()
        full = tuple(n * self.world if d == dim else n for d, n in enumerate(shape))
        part = f.get_slice(key)
        if tuple(part.get_shape()) != full:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(part.get_shape())}, but the config "
                                  f"implies {list(full)}")
        index = slice(self.rank * shape[dim], (self.rank + 1) * shape[dim])
        return (part[index] if dim == 0 else part[:, index]).clone(memory_format=torch.contiguous_format)

    def row_max(self, name: str, amax: torch.Tensor) -> torch.Tensor:
        """The largest magnitude of each row of matrix `name`, from those of this rank's slice
        (`amax` [N]): for an int8 quantization that computes what one process's does, per whole row
        (quantize.py). Ranks holding whole rows have them already; wo and w2's column slices take
        the maximum over the ranks (every rank loads the same tensors in the same order)."""
        if split_dim(name, 2) != 1:
            return amax
        collective(dist.all_reduce, amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax

    def check_quantization(self, args: ModelArgs, quantization) -> None:
        """int4's groups run along the input dimension: wo's and w2's column slices must hold whole groups."""
        if quantization is None or quantization.method != "int4":
            return
        for layer, width in (("wo", args.n_heads * args.head_dim), ("w2", args.hidden_dim)):
            part = width // self.world
            if part % quantization.group_size:
                raise TensorParallelError(
                    f"tensor parallelism over {self.world} ranks splits {layer}'s {width} input features into slices "
                    f"of {part}, which int4 groups of {quantization.group_size} do not divide: use a group size that "
                    f"divides {part} (int4-<group size>), or fewer ranks")


def split_dim(name: str, ndim: int) -> int | None:
    """Along which dimension tensor `name` (of `ndim` dimensions) is split across ranks; None: whole
    (replicated on every rank)."""
    if name.endswith(_ROWS):
        return 0
    if name.endswith(_COLUMNS) and ndim == 2:
        return 1
    return None


def _divisors(args: ModelArgs) -> str:
    ok = [n for n in range(1, args.n_kv_heads + 1)
          if not (args.n_kv_heads % n or args.n_heads % n or args.hidden_dim % n or args.vocab_size % n)]
    return ", ".join(map(str, ok))


# --- launching under torchrun -----------------------------------------------------------------------


def world_size() -> int:
    """How many ranks the launcher started (1 without one): known before joining the group."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Under torchrun (or any launcher that sets the same variables) with more than one rank."""
    return world_size() > 1


def follower() -> bool:
    """A rank other than 0 of a torchrun launch: it serves nothing itself and follows rank 0's steps."""
    return launched() and int(os.environ.get("RANK", "0")) != 0


def init(device: torch.device) -> tuple[Shard, torch.device]:
    """Join the process group the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR...); returns this
    rank's Shard and its device (cuda:LOCAL_RANK for a CUDA device)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
        atexit.register(leave)  # after the handlers registered later (a Leader's close): they run first
    # The followers wait for rank 0's next step for as long as the server stays idle: on a group of
    # their own, so that the model's collectives keep their deadline.
    control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    return Shard(dist.get_rank(), dist.get_world_size(), control=control), device


def leave() -> None:
    """Destroy this rank's process groups, if they are still there; at exit. A rank that exits (an
    error, a refusal) with its groups alive leaves gloo's threads running into interpreter teardown,
    where they may abort the process (SIGABRT, "terminate called without an active exception") in
    place of its exit status."""
    if dist.is_initialized():
        dist.destroy_process_group()


def load_model(folder: str | Path, device: torch.device, **kwargs):
    """loader.load_model under torchrun: every rank loads its shard, then `lead_or_follow`: rank 0
    gets the model back, the other ranks do not return."""
    from .loader import find_checkpoint, load_model as load_one
    from .quantize import Quantization, read_quantization

    shard, device = init(device)
    ckpt = find_checkpoint(folder, kwargs.get("prefer"))
    shard.check_quantization(ckpt.args(), read_quantization(ckpt.folder) or Quantization.parse(kwargs.get("quantize")))
    model = load_one(folder, device=device, shard=shard, **kwargs)
    check_same_weights(folder, kwargs.get("prefer"), model, shard)
    return lead_or_follow(model, shard)


def lead_or_follow(model: Transformer, shard: Shard):
    """This rank's part of a loaded model, put to work: on rank 0 it is returned behind a `Leader`
    (tp_replay.py), whose calls every rank runs together; on the other ranks this does not return:
    they replay rank 0's model calls until rank 0 is done, then exit the process."""
    from .tp_replay import Leader, follow

    if shard.rank == 0:
        return Leader(model, shard)
    try:
        follow(model, shard)
    except TensorParallelError as e:
        print(f"mistral: rank {shard.rank}: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # no exit handlers: they would wait on the process group that just failed
    dist.destroy_process_group()
    sys.exit(0)


def check_same_weights(folder: str | Path, prefer: str | None, model: Transformer, shard: Shard) -> None:
    """Refuse to run when the ranks read different checkpoints (another folder, another copy): their
    slices would not add up to any model. Compares the config, the safetensors headers (names,
    shapes, dtypes) and the sums of the replicated tensors, which every rank holds whole."""
    from .loader import find_checkpoint

    ckpt = find_checkpoint(folder, prefer)
    digest = hashlib.sha256(ckpt.config_file.read_bytes())
    for path in ckpt.tensor_files:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            digest.update(f.read(n))
    sums = [float(p.double().sum()) for name, p in model.named_parameters() if "norm" in name or "tok_embeddings" in name]
    mine = (digest.hexdigest()[:16], sums)
    everyone: list = [None] * shard.world
    collective(dist.all_gather_object, everyone, mine, group=shard.control)
    for rank, theirs in enumerate(everyone):
        if theirs != everyone[0]:
            what = "config or tensor layout" if theirs[0] != everyone[0][0] else "replicated tensors' values"
            raise TensorParallelError(
                f"rank {rank} read different weights from rank 0 ({what} differ): every rank must load the same "
                f"checkpoint (rank {shard.rank} read {ckpt.folder})")

