"""What the model is, in numbers: its tensors, its memory, and the speed floor a GPU's spec implies.

Arithmetic on `ModelArgs` and the model's tensor list (read off `Transformer` built on the meta
device: no memory, no weights loaded). Three numbers explain most of what a
decoder-only transformer costs:

    parameters      every weight is read once per forward pass, whatever the number of tokens in it
    KV bytes/token  2 (K and V) × n_layers × n_kv_heads × head_dim × bytes: what each position of
                    context costs in memory, and what each generated token reads again
    FLOPs/token     2 per weight of every matmul (a multiply and an add), plus the attention scores
                    and the weighted sum over the context: 4 × n_heads × head_dim per visible key

The roofline model then bounds the time of a forward pass from below by the slower of two
budgets: bytes moved / memory bandwidth, and FLOPs / peak FLOP rate. Decoding one token at
batch 1 does about 1 FLOP per byte of weights read, far below any GPU's ridge point (hundreds of
FLOPs per byte), so decode is memory-bound; a long prefill does hundreds of FLOPs per byte, so it
is compute-bound. Elementwise work (norms, rotary, SiLU, softmax) and activations are left out:
they are small next to the matmuls and the weights, so the floor stays a floor.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path

from .args import PRESETS, ModelArgs
from .formats import DTYPES, QUANTIZATIONS
from .errors import CheckpointError, MistralError

# The context length Mistral-7B-v0.3 was trained for (config.json's max_position_embeddings);
# params.json does not record it, so it is a default here rather than a field of ModelArgs.
DEFAULT_MAX_CONTEXT = 32768

# Bytes per stored value. int8/int4 are weight-only quantisation: the matmuls still run in bf16.
DTYPE_BYTES: dict[str, float] = {**{name: d.bytes for name, d in DTYPES.items()}, **QUANTIZATIONS}


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorGroup:
    """Tensors that share a name pattern and a shape: one per layer, or a single one."""

    name: str  # checkpoint name, `layers.*.` standing for every layer
    shape: tuple[int, ...]
    count: int  # how many tensors (n_layers for per-layer groups)
    role: str
    matmul: bool  # a weight that multiplies activations (2 FLOPs per element per token)

    @property
    def params_each(self) -> int:
        return math.prod(self.shape)

    @property
    def params(self) -> int:
        return self.count * self.params_each


# What each tensor of the checkpoint does, in the order the forward pass uses them; `layers.*.` stands
# for every layer. The names and shapes themselves come from the model (loader.tensor_shapes).
ROLES = {
    "tok_embeddings.weight": "token embeddings (a lookup)",
    "layers.*.attention_norm.weight": "RMSNorm before attention",
    "layers.*.attention.wq.weight": "queries, {n_heads} heads",
    "layers.*.attention.wk.weight": "keys, {n_kv_heads} KV heads",
    "layers.*.attention.wv.weight": "values, {n_kv_heads} KV heads",
    "layers.*.attention.wo.weight": "attention output",
    "layers.*.ffn_norm.weight": "RMSNorm before feed-forward",
    "layers.*.feed_forward.w1.weight": "SwiGLU gate",
    "layers.*.feed_forward.w3.weight": "SwiGLU up",
    "layers.*.feed_forward.w2.weight": "SwiGLU down",
    "norm.weight": "final RMSNorm",
    "output.weight": "output head (untied)",
}


@functools.lru_cache(maxsize=16)
def tensor_groups(args: ModelArgs) -> tuple[TensorGroup, ...]:
    """Every tensor of the checkpoint, grouped, in the order the forward pass uses them."""
    from .loader import tensor_shapes

    shapes = tensor_shapes(args)
    if {name.replace("*", str(i)) for name in ROLES for i in range(args.n_layers)} != set(shapes):
        raise AssertionError(f"describe.ROLES and the model's tensors differ: {sorted(set(shapes) ^ set(ROLES))}")
    return tuple(
        TensorGroup(name, shape, args.n_layers if name.startswith("layers.*.") else 1, role.format(**dataclasses.asdict(args)),
                    matmul=len(shape) == 2 and name != "tok_embeddings.weight")
        for name, role in ROLES.items() for shape in [shapes[name.replace("*", "0")]]
    )


def count_parameters(args: ModelArgs) -> int:
    return sum(g.params for g in tensor_groups(args))


def kv_bytes_per_token(args: ModelArgs, bytes_per_value: float = 2, n_kv_heads: int | None = None) -> float:
    """K and V of one position in every layer. `n_kv_heads` overrides the model's, to compare with MHA."""
    return 2 * args.n_layers * (n_kv_heads or args.n_kv_heads) * args.head_dim * bytes_per_value


# ---------------------------------------------------------------------------------------------
# Costs and the roofline
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s of device memory
    flops: float  # FLOP/s: dense (no 2:4 sparsity) bf16/fp16 tensor-core peak
    source: str = "spec sheet"


# Vendor spec-sheet peaks. Measured figures are lower: a good kernel reaches roughly 80-90% of the
# bandwidth and 60-80% of the FLOP rate.
GPUS: dict[str, GPU] = {
    "h100": GPU("NVIDIA H100 SXM5 80GB (HBM3)", 3.35e12, 989.4e12),
    "h100-pcie": GPU("NVIDIA H100 PCIe 80GB (HBM2e)", 2.0e12, 756.5e12),
    "h200": GPU("NVIDIA H200 SXM 141GB (HBM3e)", 4.8e12, 989.4e12),
    "a100": GPU("NVIDIA A100 SXM4 80GB (HBM2e)", 2.039e12, 312e12),
    "l4": GPU("NVIDIA L4 24GB (GDDR6)", 300e9, 121e12),
    "rtx4090": GPU("NVIDIA GeForce RTX 4090 24GB (GDDR6X)", 1008e9, 165.2e12),
}


def gpu(name: str | None = None, bandwidth_gbs: float | None = None, tflops: float | None = None) -> GPU:
    """A preset (`h100`, the default, ...), or explicit numbers: bandwidth in GB/s, peak in TFLOP/s.

    With a preset named, either number replaces the preset's; without one, both must be given.
    """
    for label, value in (("bandwidth", bandwidth_gbs), ("tflops", tflops)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            raise MistralError(f"--{label} must be a positive number, got {value!r}")
    if name is None and (bandwidth_gbs is None) != (tflops is None):
        raise MistralError("give both --bandwidth and --tflops, or name a --gpu preset to supply the other")
    if name is None and bandwidth_gbs is not None:
        return GPU("a GPU with the given figures", bandwidth_gbs * 1e9, tflops * 1e12, "given")
    base = GPUS.get((name or "h100").lower())
    if base is None:
        raise MistralError(f"unknown GPU {name!r}; choose one of {', '.join(GPUS)}, or give --bandwidth and --tflops")
    if bandwidth_gbs is None and tflops is None:
        return base
    return GPU(
        f"{base.name}, with given figures",
        base.bandwidth if bandwidth_gbs is None else bandwidth_gbs * 1e9,
        base.flops if tflops is None else tflops * 1e12,
        "spec sheet, partly given",
    )


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one forward pass; `floor_s` is the roofline's lower bound on its time."""

    flops: float
    bytes: float

    @property
    def intensity(self) -> float:  # FLOP per byte
        return self.flops / self.bytes

    def floor_s(self, g: GPU) -> float:
        return max(self.flops / g.flops, self.bytes / g.bandwidth)

    def bound(self, g: GPU) -> str:
        return "compute" if self.flops / g.flops > self.bytes / g.bandwidth else "memory"


def _span(position: int, window: int | None) -> int:
    """Keys visible to the token at 0-based `position`: itself and all before it, within the window."""
    return position + 1 if window is None else min(position + 1, window)


def _matmul_params(args: ModelArgs) -> tuple[int, int]:
    """(weights of the layers' matmuls, weights of the output head)."""
    layers = sum(g.params for g in tensor_groups(args) if g.matmul and g.name.startswith("layers."))
    return layers, args.vocab_size * args.dim


def decode_cost(args: ModelArgs, seq_len: int, batch: int = 1, weight_bytes: float = 2, kv_bytes: float = 2) -> Cost:
    """One decode step: `batch` rows each generate token number `seq_len` (position seq_len - 1).

    Weights are read once for the whole batch (that is why batching helps); each row reads its
    own KV cache. Attention per layer: scores q·k and the weighted sum of v, 2 FLOPs per
    multiply-add, over n_heads × head_dim × visible keys, twice.
    """
    layers, head = _matmul_params(args)
    span = _span(seq_len - 1, args.sliding_window)
    attn_flops = 4 * args.n_layers * args.n_heads * args.head_dim * span
    flops = batch * (2 * (layers + head) + attn_flops)
    weights = weight_bytes_read(args, batch, weight_bytes)
    kv = batch * kv_bytes_per_token(args, kv_bytes) * (span + 1)  # read the visible keys/values, write the new one
    return Cost(flops, weights + kv)


def weight_bytes_read(args: ModelArgs, rows: int, weight_bytes: float) -> float:
    """Bytes of weights a pass over `rows` tokens reads: all weights but the embedding table, of
    which each token reads one line of `dim` values."""
    return (count_parameters(args) - args.vocab_size * args.dim + rows * args.dim) * weight_bytes


def prefill_cost(args: ModelArgs, n_tokens: int, weight_bytes: float = 2, kv_bytes: float = 2) -> Cost:
    """One forward pass over an `n_tokens` prompt (batch 1), keeping the logits of the last position only.

    Attention is causal, so token t sees t+1 keys: the attention FLOPs grow with n_tokens². K and V
    are counted written once and read once, which is what a fused (flash) attention kernel approaches.
    """
    layers, head = _matmul_params(args)
    visible = sum(_span(p, args.sliding_window) for p in range(n_tokens)) if args.sliding_window else n_tokens * (n_tokens + 1) // 2
    flops = 2 * layers * n_tokens + 2 * head + 4 * args.n_layers * args.n_heads * args.head_dim * visible
    weights = weight_bytes_read(args, n_tokens, weight_bytes)
    kv = 2 * n_tokens * kv_bytes_per_token(args, kv_bytes)
    return Cost(flops, weights + kv)


# ---------------------------------------------------------------------------------------------
# The description
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Description:
    args: ModelArgs
    source: str  # what was described: a preset name or a file
    dtype: str  # weights' dtype for the memory and roofline figures
    kv_dtype: str
    max_context: int
    batch: int
    seq_lens: tuple[int, ...]
    gpu: GPU
    checkpoint: dict | None = None  # what the safetensors headers hold, when a weights folder was given

    @property
    def groups(self) -> list[TensorGroup]:
        return tensor_groups(self.args)

    @property
    def total_params(self) -> int:
        return count_parameters(self.args)

    def to_dict(self) -> dict:
        a, wb, kb = self.args, DTYPE_BYTES[self.dtype], DTYPE_BYTES[self.kv_dtype]
        per_layer = {
            "attention": sum(g.params_each for g in self.groups if ".attention." in g.name),
            "feed_forward": sum(g.params_each for g in self.groups if ".feed_forward." in g.name),
            "norms": sum(g.params_each for g in self.groups if g.name.startswith("layers.") and "norm" in g.name),
        }
        kv_tok, kv_mha = kv_bytes_per_token(a, kb), kv_bytes_per_token(a, kb, n_kv_heads=a.n_heads)
        layers, head = _matmul_params(a)
        g = self.gpu
        roofline = []
        for n in self.seq_lens:
            d, p = decode_cost(a, n, self.batch, wb, kb), prefill_cost(a, n, wb, kb)
            roofline.append({
                "seq_len": n,
                "decode": {"flops": d.flops, "bytes": d.bytes, "flop_per_byte": d.intensity,
                           "ms_per_step": 1e3 * d.floor_s(g), "tokens_per_s": self.batch / d.floor_s(g),
                           "bound": d.bound(g)},
                "prefill": {"flops": p.flops, "bytes": p.bytes, "flop_per_byte": p.intensity,
                            "ms": 1e3 * p.floor_s(g), "tokens_per_s": n / p.floor_s(g), "bound": p.bound(g)},
            })
        return {
            "source": self.source,
            "args": a.to_params(),
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "count": t.count, "params": t.params, "role": t.role}
                for t in self.groups
            ],
            "total_params": self.total_params,
            "per_layer_params": per_layer,
            "weight_bytes": {dt: self.total_params * b for dt, b in DTYPE_BYTES.items()},
            "kv_cache": {
                "dtype": self.kv_dtype,
                "bytes_per_token": kv_tok,
                "max_context": self.max_context,
                "bytes_at_max_context": kv_tok * self.max_context,
                "bytes_per_token_without_gqa": kv_mha,
                "gqa_saving": a.n_rep,
            },
            "per_token": {
                "matmul_flops": 2 * (layers + head),
                "attention_flops_per_visible_key": 4 * a.n_layers * a.n_heads * a.head_dim,
                "weight_bytes_read": weight_bytes_read(a, 1, wb),
                "kv_bytes_read_per_visible_key": kv_tok,
            },
            "gpu": {"name": g.name, "bandwidth_bytes_per_s": g.bandwidth, "flops_per_s": g.flops, "source": g.source,
                    "ridge_flop_per_byte": g.flops / g.bandwidth},
            "roofline": {"dtype": self.dtype, "batch": self.batch, "rows": roofline},
            "checkpoint": self.checkpoint,
        }

    def format(self) -> str:
        d = self.to_dict()
        a = self.args
        out: list[str] = []
        window = f"sliding window {a.sliding_window}" if a.sliding_window else "no sliding window"
        out.append(f"Mistral architecture of {self.source}")
        out.append(
            f"  dim {a.dim} · {a.n_layers} layers · {a.n_heads} query heads sharing {a.n_kv_heads} KV heads "
            f"({a.n_rep} per group) · head_dim {a.head_dim} · FFN hidden {a.hidden_dim} · vocab {a.vocab_size} · "
            f"rope θ {_number(a.rope_theta)} · norm ε {_number(a.norm_eps)} · {window}"
        )
        out.append("")
        out.append(f"  {'tensor':<34} {'shape':>14} {'×':>4} {'parameters':>15}  role")
        for t in self.groups:
            shape = "[" + ", ".join(map(str, t.shape)) + "]"
            out.append(f"  {t.name:<34} {shape:>14} {t.count:>4} {t.params:>15,}  {t.role}")
        out.append(f"  {'total':<34} {'':>14} {'':>4} {self.total_params:>15,}")
        pl = d["per_layer_params"]
        out.append(
            f"  one layer: {sum(pl.values()):,} = attention {pl['attention']:,} + feed-forward "
            f"{pl['feed_forward']:,} + norms {pl['norms']:,}"
        )
        out.append("")
        out.append("Weights in memory")
        out.append("  " + " · ".join(f"{dt} {_size(b)} ({b / 1e9:.4g} GB)" for dt, b in d["weight_bytes"].items()))
        kv = d["kv_cache"]
        out.append("")
        out.append(f"KV cache ({self.kv_dtype})")
        out.append(
            f"  per token: 2 (K, V) × {a.n_layers} layers × {a.n_kv_heads} KV heads × {a.head_dim} × "
            f"{DTYPE_BYTES[self.kv_dtype]:g} B = {kv['bytes_per_token']:,.0f} B ({_size(kv['bytes_per_token'])})"
        )
        out.append(f"  at {self.max_context:,} tokens of context: {_size(kv['bytes_at_max_context'])} per sequence")
        if a.n_rep > 1:
            out.append(
                f"  with one KV head per query head (no GQA) it would be {_size(kv['bytes_per_token_without_gqa'])}/token, "
                f"{_size(kv['bytes_per_token_without_gqa'] * self.max_context)} at {self.max_context:,}: GQA saves {a.n_rep}×"
            )
        pt = d["per_token"]
        out.append("")
        out.append(f"Per generated token (batch 1, weights {self.dtype})")
        out.append(
            f"  FLOPs: {_count(pt['matmul_flops'])} in matmuls (2 × {pt['matmul_flops'] // 2:,} weights) "
            f"+ {_count(pt['attention_flops_per_visible_key'])} per visible key in attention"
        )
        out.append(
            f"  bytes: {_size(pt['weight_bytes_read'])} of weights (all but the embedding table, of which one row) "
            f"+ {_size(pt['kv_bytes_read_per_visible_key'])} of KV cache per visible key"
        )
        gi = d["gpu"]
        out.append("")
        if self.gpu.source.startswith("spec"):
            note = "spec-sheet peaks, dense; measured figures are lower"
        else:
            note = "figures as given"
        out.append(
            f"Roofline floor on {gi['name']}: {gi['bandwidth_bytes_per_s'] / 1e12:.3g} TB/s, "
            f"{gi['flops_per_s'] / 1e12:.4g} TFLOP/s bf16 ({note})"
        )
        out.append(
            f"  ridge point {gi['ridge_flop_per_byte']:.0f} FLOP/byte: below it a pass is memory-bound, above it compute-bound"
        )
        out.append(
            f"  {'seq_len':>8} │ {'decode ms/step':>14} {'tok/s':>9} {'FLOP/B':>7} {'bound':>7} │ "
            f"{'prefill ms':>11} {'tok/s':>10} {'FLOP/B':>7} {'bound':>7}"
        )
        for r in d["roofline"]["rows"]:
            dc, pf = r["decode"], r["prefill"]
            out.append(
                f"  {r['seq_len']:>8,} │ {dc['ms_per_step']:>14.3f} {dc['tokens_per_s']:>9,.0f} {dc['flop_per_byte']:>7.1f} "
                f"{dc['bound']:>7} │ {pf['ms']:>11.2f} {pf['tokens_per_s']:>10,.0f} {pf['flop_per_byte']:>7.0f} {pf['bound']:>7}"
            )
        out.append(
            f"  decode: batch {self.batch}, one step generates token number seq_len of each row; "
            "prefill: a seq_len-token prompt, batch 1"
        )
        if self.checkpoint:
            c = self.checkpoint
            out.append("")
            dtypes = ", ".join(f"{k} {_size(v)}" for k, v in c["bytes_by_dtype"].items())
            out.append(f"Checkpoint {c['folder']} ({c['format']} format): {c['n_tensors']} tensors in {len(c['files'])} file(s)")
            out.append(f"  {c['params']:,} parameters ({dtypes})")
            if c["params"] == self.total_params and c["n_tensors"] == sum(g.count for g in self.groups):
                out.append("  matches the configuration")
            else:
                out.append(
                    f"  does NOT match the configuration: expected {sum(g.count for g in self.groups)} tensors, "
                    f"{self.total_params:,} parameters"
                )
        return "\n".join(out)


def describe(
    args: ModelArgs,
    source: str = "",
    dtype: str = "bfloat16",
    kv_dtype: str | None = None,
    gpu_spec: GPU | None = None,
    batch: int = 1,
    seq_lens: tuple[int, ...] = (512, 4096, 32768),
    max_context: int = DEFAULT_MAX_CONTEXT,
    checkpoint: dict | None = None,
) -> Description:
    for name, value in (("dtype", dtype), ("kv_dtype", kv_dtype or "bfloat16")):
        if value not in DTYPE_BYTES:
            raise MistralError(f"unknown {name} {value!r}; choose one of {', '.join(DTYPE_BYTES)}")
    kv_dtype = kv_dtype or (dtype if dtype in DTYPES else "bfloat16")
    for name, value in (("batch", batch), ("max_context", max_context), *(("seq_len", n) for n in seq_lens)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MistralError(f"{name} must be a positive integer, got {value!r}")
    if not seq_lens:
        raise MistralError("give at least one sequence length")
    return Description(
        args, source, dtype, kv_dtype, max_context, batch, tuple(seq_lens), gpu_spec or GPUS["h100"], checkpoint
    )


# ---------------------------------------------------------------------------------------------
# Where the configuration comes from
# ---------------------------------------------------------------------------------------------


def resolve(source: str | Path, prefer: str | None = None) -> tuple[ModelArgs, str, dict | None]:
    """A preset name, a weights folder, or a params.json/config.json file -> (args, label, checkpoint).

    A folder with only a params.json or config.json (no tensors) is described from that file.
    """
    from .loader import find_checkpoint

    if isinstance(source, str) and source in PRESETS:
        return PRESETS[source], f"preset {source}", None
    path = Path(source)
    if path.is_file():
        return ModelArgs.from_file(path), str(path), None
    if path.is_dir():
        try:
            ckpt = find_checkpoint(path, prefer)
        except CheckpointError:
            for name in ("params.json", "config.json"):
                if (path / name).is_file():
                    return ModelArgs.from_file(path / name), str(path / name), None
            raise
        return ckpt.args(), str(ckpt.folder), checkpoint_summary(ckpt)
    raise MistralError(
        f"{source}: not a preset ({', '.join(PRESETS)}), a weights folder, or a params.json/config.json file"
    )


def checkpoint_summary(ckpt) -> dict:
    """Count what the safetensors headers declare (shapes and dtypes only; no tensor is read)."""
    from safetensors import safe_open

    n_tensors, params, by_dtype = 0, 0, {}
    itemsize = {**{d.safetensors: d.bytes for d in DTYPES.values()}, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
    for path in ckpt.tensor_files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    n, dt = math.prod(s.get_shape()), s.get_dtype()
                    n_tensors += 1
                    params += n
                    by_dtype[dt] = by_dtype.get(dt, 0) + n * itemsize.get(dt, 0)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own error types, OSError, ...
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return {
        "folder": str(ckpt.folder),
        "format": ckpt.format,
        "files": [p.name for p in ckpt.tensor_files],
        "n_tensors": n_tensors,
        "params": params,
        "bytes_by_dtype": by_dtype,
    }


# ---------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    """Bytes in binary units (KiB, MiB, GiB), as memory is sized."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:g} B"


def _number(x: float) -> str:
    return f"{int(x):,}" if float(x).is_integer() and abs(x) >= 1 else f"{x:g}"


def _count(n: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:g} FLOP"
