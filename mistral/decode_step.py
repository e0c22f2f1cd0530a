"""One decode step of the engine's rows, and the three ways it runs: eagerly, through torch.compile
(the CPU fast path) or replayed from CUDA graphs (a GPU with the Triton kernels).

A step takes rows 0..batch-1 one token further: their last tokens through the model (writing their
keys and values into the cache), their next tokens sampled, and their state moved on (`Rows.record`).
Everything it reads lives on the device, in tensors of fixed shape (rows.py, kv_cache.py), so the
host reads back only the sampled tokens, once, to stream them; that is also what lets the step be
captured in a CUDA graph or compiled into one function.

    DecodeStep.__call__    the step, whichever way it runs, with the fallbacks to eager
    forward_and_sample     model and sampler only, changing nothing but the cache: what a graph captures
    advance                forward_and_sample, then the rows moved on: what eager runs, torch.compile compiles
    with_chunks            a mixed step: the rows' step and prompt chunks in one eager forward (PackedView)
"""

from __future__ import annotations

import contextlib
import inspect
import logging

import torch

from .kv_cache import PackedView, PagedKVCache
from .model import Transformer
from .rows import Rows
from .sampling import BatchFlags, sample

log = logging.getLogger("mistral")

# inductor's options for a decode step's forward. realize_opcount_threshold=0: store each
# intermediate rather than recompute it inside its consumers. Otherwise inductor inlines an RMSNorm
# (its rsqrt included) into the inner loop of the next mat-vec, once per weight row; storing it made
# decode steps 5-25% faster here.
#
# size_asserts=False, for every step: the generated code checks no input's and no custom op's output's
# sizes and strides (~285 checks, 0.17 ms a 0.5B step). dynamo's guards check the inputs' shapes, and the
# CPU kernels' output shapes are those their registered fakes give (kernels/cpu, tested).
STEP_OPTIONS = {"size_asserts": False}
FORWARD_OPTIONS = {**STEP_OPTIONS, "realize_opcount_threshold": 0}

# dynamo's settings while it traces a decode step and builds its guards (set around each call, so
# other compiled functions of the process keep theirs; they are read only when a step is compiled):
#   specialize_float                    the model's float constants (each RMSNorm's eps) are constants of
#                                       the graph, not 33 scalar inputs wrapped into tensors each call
#   enable_cpp_symbolic_shape_guards    the guards on the step's few ints checked in C++, not Python
#   use_recursive_dict_tags_for_guards  a module whose __dict__ is unchanged since the last call (dicts
#                                       carry a version tag) is not checked attribute by attribute
# The step is a function of persistent tensors (rows.py), so none of this can change what it computes.
# Together, on a 0.5B int4 step: dynamo's guards 0.65 -> 0.45 ms, its pre-graph code 0.19 -> 0.07 ms.
class TraceConfig:
    """`with TRACE_CONFIG:` dynamo's config set to these settings (each one this torch has), then put
    back: ~12 us, where `torch._dynamo.config.patch` takes ~80. Process-wide while it lasts, as dynamo's
    config is; the engine's steps run on one thread."""

    def __init__(self, **settings: bool):
        self.settings = {name: value for name, value in settings.items() if hasattr(torch._dynamo.config, name)}
        self.saved: list = []

    def __enter__(self) -> None:
        config = torch._dynamo.config
        self.saved = [getattr(config, name) for name in self.settings]
        for name, value in self.settings.items():
            setattr(config, name, value)

    def __exit__(self, *exc) -> None:
        for name, value in zip(self.settings, self.saved):
            setattr(torch._dynamo.config, name, value)


TRACE_CONFIG = TraceConfig(specialize_float=True, enable_cpp_symbolic_shape_guards=True,
                           use_recursive_dict_tags_for_guards=True)


class DecodeStep:
    """`step(batch, flags, length)`: rows 0..batch-1 one token further, attending over `length` cache
    positions, sampled with the features `flags` names; returns the logits [batch, V] and the tokens
    [batch]. `graphs` (cuda_graphs.CapturedSteps) and `compiled` say which way it runs: neither is eager."""

    def __init__(self, model: Transformer, cache: PagedKVCache, rows: Rows, eos_id: int, *,
                 compile: bool = False, cuda_graphs: bool | None = None):
        self.model, self.cache, self.rows, self.eos_id = model, cache, rows, eos_id
        if compile and cuda_graphs:
            raise ValueError("choose one of compile=True and cuda_graphs=True: both replace the eager decode step")
        self.graphs = None if compile else self._captured_steps(cuda_graphs)  # None: no CUDA graphs
        self.compiled = self._compile() if compile else None  # None: eager (or fallen back to it)

    def __call__(self, batch: int, flags: BatchFlags, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A replayed CUDA graph covers the whole cache whatever `length` says (the Triton decode kernel
        reads each row's own length), and a bucket of rows from `batch` up; the first `batch` are ours.

        A compiled step that fails (no C++ compiler, a compiler bug, but also an error the eager step
        would raise too, such as running out of memory) is dropped for the eager one for good, with a
        warning; the rows' state is put back first, since a step may fail after moving some of it on
        (the eager rerun writes the same cache positions again). Keeping that copy costs 3-4 small
        clones a step."""
        graphed = self.graphs(batch, flags) if self.graphs is not None else None
        if graphed is not None:
            logits, next_tokens = graphed[0][:batch], graphed[1][:batch]
            self.rows.record(0, batch, next_tokens, flags, fed=True)
            return logits, next_tokens
        with self._announced(batch, length):
            if self.compiled is not None:
                moved = self.rows.moved_by_step(batch, flags)
                saved = [t.clone() for t in moved]
                try:
                    return self.compiled(batch, flags, length)
                except Exception as e:
                    log.warning("the compiled decode step failed (%s: %s); decoding eagerly from now on",
                                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                    self.compiled = None
                    for t, before in zip(moved, saved):
                        t.copy_(before)
            return self.advance(batch, flags, length)

    def _announced(self, batch: int, length: int):
        """A model that tells other processes of each call from the host before making it (tensor
        parallelism's Leader, tp_replay.py) cannot do so from inside a compiled step: the step's
        model call is announced here, before the step runs. Nothing to do for a plain model."""
        announced = getattr(self.model, "announced", None)
        if announced is None:
            return contextlib.nullcontext()
        rows = self.rows
        return announced(rows.tokens[:batch, None], rows.pos[:batch], self.cache.view(0, batch, length=length),
                         compiled=self.compiled is not None)

    def forward_and_sample(self, batch: int, flags: BatchFlags, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..batch-1 through the model over `length` cache positions (None: all of them), and
        their next tokens sampled: the logits [batch, V] and the tokens [batch]. Reads only persistent
        tensors and writes only the cache at the fed positions, as a captured graph must (its warm-up
        runs may not move any row on)."""
        rows = self.rows
        logits = self.model(rows.tokens[:batch, None], rows.pos[:batch], self.cache.view(0, batch, length=length))[:, -1]
        return logits, sample(logits, rows.sampling(0, batch, flags), flags, self.eos_id)

    def advance(self, batch: int, flags: BatchFlags, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, next_tokens = self.forward_and_sample(batch, flags, length)
        self.rows.record(0, batch, next_tokens, flags, fed=True)
        return logits, next_tokens

    def with_chunks(self, batch: int, flags: BatchFlags, length: int,
                    chunks: list[tuple[list[int], int, torch.Tensor, bool]]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """`advance`, with prompt chunks read in the same forward: each `(tokens, start, block_table
        [1, n], last)` writes its tokens at positions start.. through its table; for a chunk that ends
        its prompt (`last`), the logits [1, V] of its last token (else None). One forward of batch +
        sum(len(tokens)) rows, one token each (kv_cache.PackedView): the linear layers read their weights
        once for all, attention stays per sequence. Eager: the rows' counts vary from step to step."""
        rows, dev = self.rows, self.rows.tokens.device
        parts = [(slice(0, batch), self.cache.view(0, batch, length=length), False)]
        tokens, positions, logit_rows = [rows.tokens[:batch]], [rows.pos[:batch]], list(range(batch))
        for chunk, start, table, _ in chunks:
            n = batch + sum(len(t) for t in tokens[1:])
            parts.append((slice(n, n + len(chunk)), self.cache.with_table(table, start + len(chunk)), True))
            tokens.append(torch.tensor(chunk, dtype=torch.long, device=dev))
            positions.append(torch.arange(start, start + len(chunk), device=dev))
        ends = [p[0].stop - 1 for p in parts[1:]]
        logit_rows += [end for end, (*_, last) in zip(ends, chunks) if last]
        logits = self.model(torch.cat(tokens)[:, None], torch.cat(positions), PackedView(parts),
                            rows=torch.tensor(logit_rows, device=dev))[:, -1]  # [batch + prompts ending, V]
        next_tokens = sample(logits[:batch], rows.sampling(0, batch, flags), flags, self.eos_id)
        rows.record(0, batch, next_tokens, flags, fed=True)
        firsts = iter(logits[batch:].split(1))
        return logits[:batch], next_tokens, [next(firsts) if last else None for *_, last in chunks]

    def advance_filtering(self, batch: int, flags: BatchFlags, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`advance`, as a function of its own, so that torch.compile caches it apart (see _compile)."""
        return self.advance(batch, flags, length)

    def batch_sizes(self) -> list[int]:
        """Batch sizes that each need their own preparation: one per compiled graph (batch 1, 2-4 rows,
        more: see `cpu_linear` in ops.py) or per CUDA graph bucket."""
        if self.graphs is not None:
            return list(self.graphs.buckets)
        return sorted({min(rows, self.rows.count) for rows in (1, 2, 5)})

    # --- torch.compile --------------------------------------------------------------------------------

    def _compile(self):
        """`advance` through torch.compile; prefill stays eager, since each prompt length would be a
        new shape.

        On the CPU this is the fast path. Eager PyTorch runs a decode step as a few hundred separate
        ops, ~1 ms of dispatch on a small model, and its bf16 mat-vecs read 15-18 GB/s; inductor fuses
        the glue between matmuls, the sampler and the state update into a few C++ loops, and the
        mat-vecs into vectorised reductions that read at memory speed (see `cpu_linear` in ops.py;
        BENCHMARKS.md has the figures), and the step costs one Python call. The price is compilation:
        ~10 s for the small preset, ~1 min at 0.5B, on 2 cores, for the first step of each batch class
        (1 row, 2-4, more) and each set of sampling features (`BatchFlags`; `Mistral.warm_up` does the
        common ones ahead). Shapes are dynamic, so the growing cache length does not recompile. Needs a
        C++ compiler on the CPU.

        Only the PyTorch ops are compiled: on CUDA the Triton kernels and CUDA graphs (the default
        there) do this job.
        """
        if self.model.ops.name not in ("torch", "cpu"):
            raise ValueError(f"compile=True (--compile) compiles the PyTorch ops (and the CPU kernels' calls); this "
                             f"model uses kernels={self.model.ops.name!r}: load it with kernels='torch' (--kernels "
                             "torch), or leave compile off on CUDA, where the Triton kernels run with CUDA graphs")
        # Each batch class (1 row, 2-4, more) x set of sampling features (greedy or not, penalties,
        # filtering, logit_bias, a token mask: 24) is a compilation of its own, 72 at most. Where torch.compile
        # takes a limit for one function (torch 2.13 does), allow them; elsewhere raise dynamo's
        # global limit (8), past which a fullgraph compile raises (and we would fall back).
        limit = {"recompile_limit": 128}
        if "recompile_limit" not in inspect.signature(torch.compile).parameters:
            limit = {}
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        # Only the ints `batch` and `length` vary (the "cpu" backend does not even read `length`: its
        # attention follows each row's own position through the block table). The cache, like the rows
        # (rows.py), keeps its shapes, and marking them static spares every call their shape guards (in
        # Python, ~0.1 ms a step).
        for t in (*self.cache.k, *self.cache.v, self.cache.block_table):
            torch._dynamo.mark_static(t)
        # FORWARD_OPTIONS, but only STEP_OPTIONS for batches that filter (top-k / top-p / min-p): with
        # realize_opcount_threshold=0 inductor (torch 2.13) miscompiles the sort of a batch of 2 or more rows: the generated code raised
        # UnboundLocalError or, with in-place buffers off, sampled wrong tokens.
        plain = torch.compile(self.advance, dynamic=True, fullgraph=True, options=FORWARD_OPTIONS, **limit)
        filtering = torch.compile(self.advance_filtering, dynamic=True, fullgraph=True, options=STEP_OPTIONS, **limit)

        def step(batch: int, flags: BatchFlags, length: int):
            with TRACE_CONFIG:
                return (filtering if flags.filtering else plain)(batch, flags, length)

        return step

    # --- CUDA graphs (see cuda_graphs.py) -------------------------------------------------------------

    def _captured_steps(self, cuda_graphs: bool | None):
        """None means: on for a CUDA model on the Triton kernels. Their decode attention reads each
        row's length on the device, so a graph over the whole cache costs no more than the rows'
        own lengths; PyTorch's attention would read the whole cache at every step. A model whose
        calls must run on the host each step (`capturable = False`: tensor parallelism's leader,
        which announces each call to the other ranks) decodes eagerly."""
        device = self.model.output.weight.device
        capturable = getattr(self.model, "capturable", True)
        if cuda_graphs is None:
            cuda_graphs = device.type == "cuda" and self.model.ops.name == "triton" and capturable
        if not cuda_graphs:
            return None
        if not capturable:
            raise ValueError("cuda_graphs=True: this model cannot be captured in a CUDA graph (a tensor-parallel "
                             "model announces each call to its other ranks from the host)")
        if device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {device}")
        from .cuda_graphs import CapturedSteps

        # forward_and_sample(batch, flags): rows 0..batch-1 over the whole cache, with the sampling
        # features `flags` names, since those are host-side choices that a graph fixes.
        return CapturedSteps(self.forward_and_sample, self.rows.count)
