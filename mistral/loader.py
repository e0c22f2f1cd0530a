"""Load a Mistral checkpoint folder, in either on-disk format, into a `Transformer`.

Mistral format (what `mistral-inference` reads):
    params.json                  hyper-parameters
    consolidated.safetensors     tensors named as in model.py (`layers.0.attention.wq.weight`)

Hugging Face format (what `transformers` reads):
    config.json                  hyper-parameters
    model.safetensors, or model-0000N-of-0000M.safetensors + model.safetensors.index.json
                                 tensors named `model.layers.0.self_attn.q_proj.weight`, with the rows
                                 of q_proj and k_proj permuted for "rotate-half" rotary embeddings

The official v0.3 repository ships both; we read the Mistral format when both are there.

The model is built on the meta device (no memory), then every tensor is read from the memory-mapped
file, converted to the target dtype and device, and assigned in place: at no point do two full
copies of the weights exist. Only safetensors is read: `.pth`/`.bin` files are pickles, which can
run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .args import ModelArgs
from .devices import resolve_device
from .formats import CONSOLIDATED, DTYPES, HF, as_dtype, dtype_name
from .hugepages import to_huge_pages
from .errors import CheckpointError
from .model import Ops, Transformer
from .ops import get_ops
from .progress import progress
from .quantize import Quantization, QuantizedLoad

log = logging.getLogger("mistral")

# Hugging Face name -> our (checkpoint) name. `{i}` is the layer index.
HF_TO_MISTRAL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",  # rows permuted
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",  # rows permuted
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}
_HF_PATTERNS = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), ours) for hf, ours in HF_TO_MISTRAL.items()
]
_MISTRAL_TO_HF_PATTERNS = [
    (re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "$"), hf) for hf, ours in HF_TO_MISTRAL.items()
]


def hf_to_mistral_name(name: str) -> str | None:
    for pattern, ours in _HF_PATTERNS:
        m = pattern.match(name)
        if m:
            return ours.format(i=m.group(1)) if m.groups() else ours
    return None


def mistral_to_hf_name(name: str) -> str:
    for pattern, hf in _MISTRAL_TO_HF_PATTERNS:
        m = pattern.match(name)
        if m:
            return hf.format(i=m.group(1)) if m.groups() else hf
    raise KeyError(name)


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Interleaved-pair rows (ours) -> rotate-half rows (HF), per head: [x0 x1 x2 x3 ...] -> [x0 x2 ... | x1 x3 ...]."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def unpermute_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_for_hf`."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def rotary_heads(name: str, args: ModelArgs) -> int | None:
    """The heads whose rows the Hugging Face layout permutes in tensor `name` (ours): wq's query
    heads and wk's key/value heads, the two inputs of the rotary embedding; None for every other tensor."""
    if name.endswith("attention.wq.weight"):
        return args.n_heads
    if name.endswith("attention.wk.weight"):
        return args.n_kv_heads
    return None


def to_hf_layout(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Tensor `name` (ours) with its rows as a Hugging Face checkpoint stores them."""
    heads = rotary_heads(name, args)
    return t if heads is None else permute_for_hf(t, heads)


def from_hf_layout(name: str, t: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """The inverse of `to_hf_layout`: a Hugging Face checkpoint's tensor with its rows as ours."""
    heads = rotary_heads(name, args)
    return t if heads is None else unpermute_from_hf(t, heads)


def tensor_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of a checkpoint, in the model's order, with its shape: read off mistral/model.py's
    `Transformer` built on the meta device (no memory), which is the one definition of them."""
    with torch.device("meta"):
        model = Transformer(args, max_seq_len=1)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


@dataclass(frozen=True)
class Checkpoint:
    """What a weights folder holds: its format, its hyper-parameter file and its tensor files."""

    folder: Path
    format: str  # CONSOLIDATED or HF
    config_file: Path
    tensor_files: tuple[Path, ...]

    def args(self) -> ModelArgs:
        return ModelArgs.from_file(self.config_file)


def find_checkpoint(folder: str | Path, prefer: str | None = None) -> Checkpoint:
    """Detect the format of a weights folder. `prefer` picks one where both are present."""
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (pass the folder that holds the checkpoint)")
    found: dict[str, Checkpoint] = {}
    if (folder / "params.json").is_file() and (folder / "consolidated.safetensors").is_file():
        found[CONSOLIDATED] = Checkpoint(
            folder, CONSOLIDATED, folder / "params.json", (folder / "consolidated.safetensors",)
        )
    if (folder / "config.json").is_file():
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            found[HF] = Checkpoint(folder, HF, folder / "config.json", _shards_from_index(index))
        elif (folder / "model.safetensors").is_file():
            found[HF] = Checkpoint(folder, HF, folder / "config.json", (folder / "model.safetensors",))
    if not found:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".pth", ".bin", ".pt"))
        if pickles:
            raise CheckpointError(
                f"{folder}: only pickled weights found ({', '.join(pickles)}); only safetensors is supported, "
                "since unpickling can run arbitrary code. Download the .safetensors files instead."
            )
        raise CheckpointError(
            f"{folder}: no recognised checkpoint: expected params.json + consolidated.safetensors (Mistral format) "
            "or config.json + model.safetensors / model.safetensors.index.json (Hugging Face format)"
        )
    if prefer is not None and prefer not in (CONSOLIDATED, HF):
        raise ValueError(f"prefer must be {CONSOLIDATED!r} or {HF!r}, got {prefer!r}")
    if prefer is not None and prefer not in found:
        raise CheckpointError(f"{folder}: no checkpoint in the {prefer!r} format here (found: {', '.join(found)})")
    choice = prefer or (CONSOLIDATED if CONSOLIDATED in found else HF)
    if len(found) == 2:
        log.info("%s holds both formats; reading the %s one", folder, choice)
    return found[choice]


def _shards_from_index(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    for name in names:
        # A shard is a file beside the index: never a path that leads out of the folder.
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name or "\\" in name:
            raise CheckpointError(f"{index}: weight_map names {name!r} as a shard; expected a file name in {index.parent}")
    names = sorted(set(names))
    shards = tuple(index.parent / name for name in names)
    for shard in shards:
        if not shard.is_file():
            raise CheckpointError(f"{shard}: listed in {index.name} but missing")
    return shards


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError, OSError, ...
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None


def load_model(
    folder: str | Path,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    kernels: str | Ops = "torch",
    max_seq_len: int = 32768,
    prefer: str | None = None,
    quiet: bool = False,
    quantize: "str | Quantization | None" = None,
    shard=None,
) -> Transformer:
    """Build the model described by `folder` and fill it with its weights.

    device defaults to CPU; dtype defaults to the checkpoint's own dtype (bfloat16 for v0.3), and
    is the activations' dtype (and the scales') of a quantized model. quantize: "int8", "int4" or
    "int4-128" quantizes the linear layers while loading, one tensor at a time (see quantize.py);
    a quantized checkpoint (`mistral quantize`) is read as such.
    shard: a `tp.Shard`, to build and read only one rank's part of a tensor-parallel model. Under
    torchrun with more than one process, every rank loads its part (see tp.load_model).
    """
    if shard is None:
        from . import tp

        if tp.launched():
            return tp.load_model(folder, torch.device(device if device is not None else "cpu"), dtype=dtype,
                                 kernels=kernels, max_seq_len=max_seq_len, prefer=prefer, quiet=quiet, quantize=quantize)
    ckpt = find_checkpoint(folder, prefer)
    args = ckpt.args()
    device = resolve_device(device if device is not None else "cpu")
    dtype = as_dtype(dtype) if dtype is not None else None
    _check_layer_count(ckpt, args)  # before building: a config's n_layers alone decides the model's size

    with torch.device("meta"):
        model = Transformer(args, max_seq_len=max_seq_len)
    if shard is not None:
        shard.apply(model)
    # A quantized load swaps the linear layers (quantize.py) and says which tensors the file holds.
    plan = QuantizedLoad.plan(ckpt, model, quantize)
    if plan is not None and shard is not None:
        plan.row_max = shard.row_max  # int8 scales of whole rows, for the ranks' column slices
    expected = plan.file_shapes if plan is not None else {name: tuple(p.shape) for name, p in model.state_dict().items()}

    def float_dtype(name: str, file_dtype: torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
        # the model's dtype, but a quantized layer's scales as the plan says (QuantizedLoad.float_dtype)
        return plan.float_dtype(name, file_dtype, model_dtype) if plan is not None else model_dtype

    state: dict[str, torch.Tensor] = {}
    seen_in: dict[str, Path] = {}
    bar = None
    for path in ckpt.tensor_files:
        with _open_safetensors(path) as f:
            keys = list(f.keys())
            if bar is None:
                bar = progress(total=len(expected), desc=f"loading {Path(folder).name}", unit="tensor", quiet=quiet)
            for key in keys:
                name = key if ckpt.format == CONSOLIDATED else hf_to_mistral_name(key)
                if name is None or name not in expected:
                    raise CheckpointError(f"{path}: unexpected tensor {key!r} (not part of a {args.n_layers}-layer Mistral model)")
                if name in seen_in:
                    raise CheckpointError(f"{path}: tensor {key!r} appears again (already in {seen_in[name]})")
                try:
                    tensor = f.get_tensor(key) if shard is None else shard.read(f, key, name, expected[name], path)
                except CheckpointError:
                    raise
                except Exception as e:
                    raise CheckpointError(f"{path}: cannot read tensor {key!r}, truncated or corrupt ({e})") from None
                if tuple(tensor.shape) != expected[name]:
                    raise CheckpointError(
                        f"{path}: tensor {key!r} has shape {list(tensor.shape)}, but {ckpt.config_file.name} "
                        f"implies {list(expected[name])}"
                    )
                if plan is not None:  # the quantized format's integer tensors where it has them, floats elsewhere
                    plan.check_dtype(path, key, name, tensor)
                if dtype_name(tensor.dtype) not in DTYPES and (plan is None or tensor.is_floating_point()):
                    # float8, or integers outside a quantized checkpoint: the model computes in neither
                    raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype_name(tensor.dtype)}; "
                                          "this loader reads float32, bfloat16 and float16 checkpoints")
                if not state:  # the first tensor tells the file's dtype: will the copies fit?
                    _check_memory(ckpt.folder, expected, tensor.dtype, dtype or tensor.dtype, device)
                if ckpt.format == HF:
                    tensor = from_hf_layout(name, tensor, model.args)
                # On CPU with the file's own dtype this is no copy: the parameter maps the file.
                file_dtype = tensor.dtype
                if tensor.is_floating_point():
                    tensor = tensor.to(device, float_dtype(name, file_dtype, dtype or file_dtype))
                else:
                    tensor = tensor.to(device)
                if tensor.is_floating_point():
                    _check_finite(path, key, file_dtype, tensor)
                if plan is not None:
                    state.update(plan.load(name, tensor))
                else:
                    state[name] = tensor
                seen_in[name] = path
                bar.update(1)
    if bar is not None:
        bar.close()

    missing = [name for name in expected if name not in state]
    if missing:
        files = ", ".join(p.name for p in ckpt.tensor_files)
        shown = missing if ckpt.format == CONSOLIDATED else [mistral_to_hf_name(m) for m in missing]
        more = f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        raise CheckpointError(f"{ckpt.folder}: missing tensor(s) {', '.join(shown[:5])}{more} in {files}")
    dtypes = {t.dtype for k, t in state.items() if t.is_floating_point() and not k.endswith(".scales")}
    if len(dtypes) > 1:  # mixed dtypes in the file and no dtype asked for: use the widest
        widest = max(dtypes, key=lambda d: torch.finfo(d).bits)
        state = {k: v.to(float_dtype(k, v.dtype, widest)) if v.is_floating_point() else v for k, v in state.items()}

    model.load_state_dict(state, strict=True, assign=True)
    n_tensors = len(state)
    # The model holds the tensors now (its parameters wrap them): dropping these references lets
    # the merge and the move below free each old copy as they replace it, not when this returns.
    state.clear()
    del tensor
    model.requires_grad_(False)
    model.init_freqs(device)
    model.use_ops(get_ops(kernels, device))
    if plan is not None:
        plan.finish(model)
    if device.type == "cpu":
        to_huge_pages(model)  # the tensors loading allocated, in 2 MiB pages: a decode step streams them faster
    model.eval()
    log.info("loaded %s (%s format, %d tensors) on %s", ckpt.folder, ckpt.format, n_tensors, device)
    return model


_LAYER_INDEX = re.compile(r"^(?:model\.)?layers\.(\d+)\.")


def _check_layer_count(ckpt: Checkpoint, args: ModelArgs) -> None:
    """The layers the tensor files hold (from their headers, no tensor read) against the config's
    count, before a model is built: a config claiming a million layers would otherwise take memory
    without end on the meta device. Widths are checked against each tensor's shape as it is read."""
    layers = set()
    for path in ckpt.tensor_files:
        with _open_safetensors(path) as f:
            layers.update(int(m.group(1)) for m in map(_LAYER_INDEX.match, f.keys()) if m)
    held = max(layers) + 1 if layers else 0
    if held < args.n_layers:  # more tensors than layers: the loop below names the first unexpected one
        files = ", ".join(p.name for p in ckpt.tensor_files)
        raise CheckpointError(f"{ckpt.config_file}: {args.n_layers} layers, but {files} hold tensors of {held}")


def _check_finite(path: Path, key: str, file_dtype: torch.dtype, tensor: torch.Tensor) -> None:
    """Refuse NaN or infinite weights, which would make every answer garbage (or non-JSON logprobs).
    One reduction over each tensor as it is loaded: the min and max are finite only if every value
    is (both propagate NaN). On the CPU that is ~14x faster than `isfinite(t).all()`, which writes a
    mask as large as the tensor: 0.07 s against 1.0 s for 50M bfloat16 values here."""
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low) & torch.isfinite(high)):
        return
    cast = f" once converted to {dtype_name(tensor.dtype)} (too large for it)" if tensor.dtype != file_dtype else ""
    raise CheckpointError(f"{path}: tensor {key!r} holds NaN or infinite values{cast}")


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None when this platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def _check_memory(folder: Path, shapes: dict[str, tuple[int, ...]], file_dtype: torch.dtype,
                  dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, before reading anything, to load a model whose weights cannot fit where they go,
    rather than let the operating system kill the process half-way. On the CPU in the file's own
    dtype the weights map the file and need no memory of their own, so there is nothing to check."""
    if device.type == "cpu" and dtype == file_dtype:
        return
    available = _available_memory(device)
    needed = sum(torch.Size(shape).numel() for shape in shapes.values()) * dtype.itemsize
    if available is not None and needed > available:
        hint = " (bfloat16 takes half as much)" if dtype == torch.float32 else ""
        raise CheckpointError(
            f"{folder}: the weights take {needed / 2**30:.1f} GiB in {dtype_name(dtype)} on {device}, "
            f"but only {available / 2**30:.1f} GiB is available there; choose a smaller dtype{hint}, or another device"
        )
