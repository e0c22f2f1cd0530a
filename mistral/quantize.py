"""Weight-only quantization of the model's linear layers: int8 per output channel, int4 in groups.

A decode step reads every weight once, so its speed is the weights' bytes over the memory
bandwidth; int8 halves the bytes of bf16, int4 (4.5 bits a weight with bf16 scales per 32) more
than triples the saving. Activations stay in the model's dtype; only the matrices change.

    int8   W[n, k] ≈ weight[n, k] · scales[n]                       weight int8 in [-127, 127]
    int4   W[n, k] ≈ (nibble[n, k] - 8) · scales[n, k // group]      nibble in [0, 15]; two a byte,
                                                                     weight[n, j] = nibble[n, 2j] | nibble[n, 2j+1] << 4

Both are symmetric (no zero point). int8: scales = max |W| of the channel / 127. int4: scales =
-(the group's value of largest magnitude) / 8, so that value is -8 exactly and all 16 levels are
used (llama.cpp's q4_0 does the same). Scales are computed in fp32 from the checkpoint's values,
rounded to the model's dtype (int4's to bf16 for an fp32 model: `Quantization.scale_dtype`), and
the integers are rounded against that rounded scale, so `dequantize` gives back exactly what the
layer computes with.

Applied from outside the reference model, by a module swap (`quantize_model`): every `Linear`
(the attention and feed-forward projections, and the output head) becomes an `Int8Linear` or
`Int4Linear`. The embedding table stays in the model's dtype: a step reads one row of it, so
quantizing it would save memory but no time. The checkpoint format is in weights/README.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError
from .formats import INT4_GROUP_SIZES, QUANTIZATIONS
from .model import Linear

CONFIG_FILE = "quantization.json"


@dataclass(frozen=True)
class Quantization:
    """What a quantized checkpoint (or a `--quantize` load) does to the linear layers."""

    method: str  # "int8" | "int4"
    group_size: int | None = None  # int4: weights per scale along the input dimension

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.method!r}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size!r}")
        if self.method == "int8" and self.group_size is not None:
            raise ValueError("int8 is per output channel: it takes no group_size")

    @classmethod
    def parse(cls, spec: "str | Quantization | None") -> "Quantization | None":
        """"int8", "int4" (groups of 32) or "int4-<group size>"; None stays None."""
        if spec is None or isinstance(spec, Quantization):
            return spec
        method, _, group = str(spec).partition("-")
        if method == "int8" and not group:
            return cls("int8")
        if method == "int4" and (not group or group.isdigit()):
            return cls("int4", int(group) if group else 32)
        raise ValueError(f"unknown quantization {spec!r}; use int8, int4 or int4-<group size> (e.g. int4-128)")

    def scale_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The scales' dtype for a model computing in `dtype`: that dtype, except int4's scales for
        an fp32 model, which are bf16: 4.5 bits a weight (the size of llama.cpp's q4_0, whose scales
        are fp16) instead of 5, a tenth less for a decode step to read. A bf16 scale is within 2^-9
        of the fp32 one, and the nibbles are rounded against it, so the error added is that
        rounding's alone (BENCHMARKS.md has the error against fp32)."""
        if self.method == "int4" and dtype == torch.float32:
            return torch.bfloat16
        return dtype

    def module(self, in_features: int, out_features: int) -> nn.Module:
        if self.method == "int8":
            return Int8Linear(in_features, out_features)
        return Int4Linear(in_features, out_features, self.group_size)

    def to_json(self) -> dict:
        return {"method": self.method, **({"group_size": self.group_size} if self.group_size else {})}


# --- the arithmetic ------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype,
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (weight [N, K] int8, scales [N] in scale_dtype). amax [N] fp32: the rows'
    largest magnitudes, when w holds only some of the matrix's columns (a tensor-parallel slice)."""
    wf = w.float()
    amax = wf.abs().amax(dim=1) if amax is None else amax
    scales = (amax / 127).clamp(min=torch.finfo(torch.float32).tiny).to(scale_dtype)
    q = torch.round(wf / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (weight [N, K/2] uint8, two nibbles a byte; scales [N, K/group_size])."""
    N, K = w.shape
    wg = w.float().view(N, K // group_size, group_size)
    # The value of largest magnitude becomes -8 exactly: all 16 levels are used (as llama.cpp's q4_0).
    extreme = wg.gather(2, wg.abs().argmax(dim=2, keepdim=True))[..., 0]  # [N, K/group], signed
    tiny = torch.finfo(torch.float32).tiny
    scales = torch.where(extreme.abs() < tiny, tiny, extreme / -8).to(scale_dtype)
    nibbles = (torch.round(wg / scales.float()[..., None]).clamp(-8, 7) + 8).to(torch.uint8).view(N, K)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), scales


def unpack_int4(weight: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] int8 in [-8, 7]."""
    low, high = weight & 0xF, weight >> 4
    return torch.stack((low, high), dim=-1).flatten(-2).to(torch.int8) - 8


def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The [N, K] matrix an Int8Linear / Int4Linear multiplies by, in `dtype` (default its scales')."""
    dtype = dtype or module.scales.dtype
    if isinstance(module, Int8Linear):
        return module.weight.to(dtype) * module.scales.to(dtype)[:, None]
    q = unpack_int4(module.weight).to(dtype)  # [N, K]
    N, K = q.shape
    return (q.view(N, -1, module.group_size) * module.scales.to(dtype)[..., None]).view(N, K)


# --- the modules ---------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """y = x Wᵀ with W = weight · scales[:, None]: int8 weights, one scale per output channel."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features))
        self.cpu_matvec = False  # set by use_cpu_kernels: decode rows go to kernels/cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x):
            from kernels.quant_matmul import int8_matmul

            out = int8_matmul(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scales)
            return out.view(*x.shape[:-1], self.out_features)
        if x.device.type == "cpu" and not torch.compiler.is_compiling() and x.numel() > 16 * self.in_features:
            # A prefill: PyTorch's int8 mat-mul ran a 512-token 0.5B prefill at 4 tok/s (vs 292 in
            # bf16, same run); one transient full-precision matrix and a GEMM do better.
            return F.linear(x, dequantize(self, x.dtype))
        if self.cpu_matvec and _cpu_kernel_input(x):
            from kernels.cpu import int8_matvec

            return int8_matvec(x.contiguous(), self.weight, self.scales)
        if x.device.type == "cpu" and (x.dtype != torch.float32 or not torch.compiler.is_compiling()):
            # A few rows: PyTorch's packed int8 mat-mul reads the int8 weights as they are (an
            # eager dequantize would write and read a full-precision copy at every call). With
            # bf16 activations it is vectorised, and the fastest way here, compiled or not (0.5B
            # decode step: 28.4 tok/s, against 19.3 for the compiled reduction below).
            out = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, self.scales.to(x.dtype))
            return out.view(*x.shape[:-1], self.out_features)
        # fp32 under torch.compile (PyTorch's packed op runs fp32 ~10x slower than bf16): written as
        # the reduction it is, so that inductor converts each int8 weight inside the loop that
        # reads it: the weights are read once, as int8.
        return _reduce(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


class Int4Linear(nn.Module):
    """y = x Wᵀ with W[n, k] = (nibble[n, k] - 8) · scales[n, k // group_size]."""

    def __init__(self, in_features: int, out_features: int, group_size: int):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"int4 groups of {group_size} do not divide the input dimension {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size))
        # PyTorch's CPU int4 mat-mul wants its own layout of the same nibbles, and the scales as
        # [K / group, N, (scale, zero)]; `pack_for_cpu` makes both (not checkpoint tensors).
        self.register_buffer("cpu_packed", None, persistent=False)
        self.register_buffer("cpu_scales_and_zeros", None, persistent=False)
        self.cpu_matvec = False  # set by use_cpu_kernels: decode rows go to kernels/cpu

    def pack_for_cpu(self) -> None:
        """Prepare PyTorch's packed CPU layout, for bf16/fp16 activations of the scales' dtype: a
        decode step then reads 4-bit weights as they are, through a vectorised kernel (0.5B decode
        step: ~7x the compiled reduction below). It costs the weights' bytes again in memory."""
        nibbles = torch.stack((self.weight & 0xF, self.weight >> 4), dim=-1).flatten(-2).to(torch.int32)  # [N, K]
        self.cpu_packed = torch._convert_weight_to_int4pack_for_cpu(nibbles, 1)
        # W = (nibble - 8) · scale + zero: symmetric, so every zero is 0
        self.cpu_scales_and_zeros = torch.stack((self.scales, torch.zeros_like(self.scales)), dim=-1).transpose(0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_triton(x):
            from kernels.quant_matmul import int4_matmul

            out = int4_matmul(x.reshape(-1, self.in_features).contiguous(), self.weight, self.scales, self.group_size)
            return out.view(*x.shape[:-1], self.out_features)
        few_rows = torch.compiler.is_compiling() or x.numel() <= 16 * self.in_features
        if few_rows and self.cpu_matvec and _cpu_kernel_input(x):
            from kernels.cpu import int4_matvec

            return int4_matvec(x.contiguous(), self.weight, self.scales, self.group_size)
        packed = self.cpu_scales_and_zeros
        if few_rows and packed is not None and x.device.type == "cpu" and x.dtype == packed.dtype:
            out = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.cpu_packed,
                                                    self.group_size, packed)
            return out.view(*x.shape[:-1], self.out_features)
        if not torch.compiler.is_compiling():
            return F.linear(x, dequantize(self, x.dtype))
        # y[n] = Σ_j (x[2j] (low[n, j] - 8) + x[2j+1] (high[n, j] - 8)) · scales[n, 2j // group], one
        # reduction over the bytes, with the scale of each byte an expanded view: inductor unpacks
        # each byte inside the loop that reads it, and stores nothing the size of W. (Written as a
        # sum over groups, or with the nibbles stacked, inductor stores the unpacked weights first.)
        N, K, G = self.out_features, self.in_features, self.scales.shape[1]
        xe = x[..., 0::2].reshape(-1, 1, K // 2)  # [M, 1, K/2] the inputs of the low nibbles
        xo = x[..., 1::2].reshape(-1, 1, K // 2)  # [M, 1, K/2] of the high nibbles
        low, high = (self.weight & 0xF).to(x.dtype) - 8, (self.weight >> 4).to(x.dtype) - 8  # [N, K/2]
        scales = self.scales.to(x.dtype)[:, :, None].expand(N, G, self.group_size // 2).reshape(N, K // 2)
        out = ((xe * low + xo * high) * scales).sum(-1)  # [M, N]
        return out.view(*x.shape[:-1], N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


def use_cpu_kernels(model: nn.Module) -> nn.Module:
    """Send the decode rows of every CPU Int8Linear / Int4Linear to the hand-written mat-vec
    kernels of kernels/cpu (the loader does, for kernels="cpu", which "auto" picks on a CPU where
    they build). Like llama.cpp's q8_0 / q4_0 dot products they quantize the activations to int8
    per block of 32, an error (at most half a step of the block's largest input) that PyTorch's
    paths below do not add; BENCHMARKS.md has both errors against fp32, and the speed."""
    for m in model.modules():
        if (isinstance(m, (Int8Linear, Int4Linear)) and m.weight.device.type == "cpu"
                and m.scales.dtype in (torch.float32, torch.bfloat16) and m.in_features % 32 == 0):
            m.cpu_matvec = True
    return model


def _cpu_kernel_input(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def pack_for_cpu(model: nn.Module) -> nn.Module:
    """On the CPU with bf16/fp16 activations and scales, give every Int4Linear PyTorch's packed
    layout (the loader calls it after a quantized load; see Int4Linear.pack_for_cpu). An fp32
    model's bf16 scales get none: the packed op computes in the scales' dtype. (A lone layer has no
    model dtype to go by: its scales' dtype is taken for the activations'.)"""
    norm = getattr(model, "norm", None)
    dtype = norm.weight.dtype if norm is not None else None
    for module in model.modules():
        if (isinstance(module, Int4Linear) and module.weight.device.type == "cpu"
                and module.scales.dtype == (dtype or module.scales.dtype) != torch.float32):
            module.pack_for_cpu()
    return model


def _use_triton(x: torch.Tensor) -> bool:
    """On CUDA a few rows (decode) go to the Triton mat-vec kernels; more (prefill) dequantize the
    matrix and use a GEMM, which re-reads the weights less than a kernel per row would."""
    return x.device.type == "cuda" and x.numel() <= 16 * x.shape[-1]


def _reduce(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [.., K] @ w [N, K]ᵀ as a broadcast product and a sum, which inductor compiles into one
    vectorised reduction loop with w's producer (a dtype conversion) fused in."""
    out = (x.reshape(-1, 1, x.shape[-1]) * w).sum(-1)  # [M, N]
    return out.view(*x.shape[:-1], w.shape[0])


# --- the module swap -----------------------------------------------------------------------------


def quantize_model(model: nn.Module, quantization: Quantization) -> nn.Module:
    """Replace every `Linear` of `model` by its quantized counterpart, in place.

    A model on the meta device gets empty quantized modules (the loader then assigns the file's
    tensors); a model with weights gets them quantized, one matrix at a time, each full-precision
    matrix freed as soon as its module is replaced."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not Linear:
                continue
            q = quantization.module(child.in_features, child.out_features)
            w = child.weight
            if w.is_meta:
                q = q.to("meta")
            else:
                q.weight, q.scales = quantize_tensor(w.detach(), quantization, quantization.scale_dtype(w.dtype))
            setattr(parent, name, q)
    return model


def quantize_tensor(w: torch.Tensor, quantization: Quantization, scale_dtype: torch.dtype,
                    amax: torch.Tensor | None = None):
    """(weight, scales) of one [N, K] matrix, on w's device (amax: see quantize_int8)."""
    if quantization.method == "int8":
        return quantize_int8(w, scale_dtype, amax)
    return quantize_int4(w, quantization.group_size, scale_dtype)


def is_quantized_name(name: str) -> bool:
    """Names of the tensors `quantize_model` turns into a (weight, scales) pair."""
    return name == "output.weight" or (name.startswith("layers.") and (".attention.w" in name or ".feed_forward.w" in name))


# --- quantized checkpoints -----------------------------------------------------------------------


def read_quantization(folder: Path) -> Quantization | None:
    """The `quantization.json` of a checkpoint folder, or None for a full-precision one."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        return Quantization(raw["method"], raw.get("group_size"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: expected an object with a \"method\" (int8 or int4)") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


class QuantizedLoad:
    """The loader's hook (see `load_model`): a quantized checkpoint read as it is, or a
    full-precision one quantized tensor by tensor as it is read."""

    def __init__(self, quantization: Quantization, stored: bool, file_shapes: dict[str, tuple[int, ...]],
                 file_dtypes: dict[str, torch.dtype]):
        self.quantization, self.stored = quantization, stored
        self.file_shapes, self.file_dtypes = file_shapes, file_dtypes
        # Tensor parallelism (tp.Shard.row_max): (name, a slice's row maxima [N]) -> the whole rows'.
        self.row_max = None

    @classmethod
    def plan(cls, ckpt, model: nn.Module, quantize: "str | Quantization | None") -> "QuantizedLoad | None":
        """None for a plain load. Otherwise swaps `model`'s (meta) linear layers for quantized ones."""
        stored = read_quantization(ckpt.folder)
        asked = Quantization.parse(quantize)
        if stored is None and asked is None:
            return None
        if stored is not None and ckpt.format != "consolidated":
            raise CheckpointError(f"{ckpt.folder}: {CONFIG_FILE} goes with a consolidated.safetensors checkpoint "
                                  f"(written by `mistral quantize`), not with the {ckpt.format} format")
        if stored is not None and asked is not None and asked != stored:
            raise CheckpointError(f"{ckpt.folder}: already quantized ({_describe(stored)}); it cannot be loaded as "
                                  f"{_describe(asked)}: quantize the full-precision checkpoint instead")
        full = {name: tuple(p.shape) for name, p in model.state_dict().items()}
        quantize_model(model, stored or asked)
        if stored is None:
            return cls(asked, False, full, {})
        state = model.state_dict()
        dtypes = {name: t.dtype for name, t in state.items() if not t.is_floating_point()}
        return cls(stored, True, {name: tuple(t.shape) for name, t in state.items()}, dtypes)

    def float_dtype(self, name: str, file_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
        """The dtype a float tensor takes in a model computing in `dtype`: that dtype, but int4's
        scales as `Quantization.scale_dtype` says; a stored checkpoint's fp32 int4 scales stay fp32,
        the values its nibbles were rounded against."""
        if not name.endswith(".scales") or self.quantization.scale_dtype(dtype) == dtype:
            return dtype
        return file_dtype if self.stored and file_dtype == torch.float32 else self.quantization.scale_dtype(dtype)

    def check_dtype(self, path: Path, key: str, name: str, tensor: torch.Tensor) -> None:
        want = self.file_dtypes.get(name)
        if want is not None and tensor.dtype != want:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected {want} "
                                  f"({_describe(self.quantization)} weights)")
        if want is None and not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, expected a float type")

    def finish(self, model: nn.Module) -> None:
        """After the tensors are in place, on the CPU: with kernels="cpu" its mat-vec kernels, each
        layer's wq|wk|wv and w1|w3 merged into one call (merged.py), else PyTorch's packed int4
        layout (which costs the int4 weights' bytes again) where it applies."""
        if model.ops.name == "cpu":
            from .merged import merge_projections

            use_cpu_kernels(model)
            if all(m.cpu_matvec for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))):
                merge_projections(model)
        else:
            pack_for_cpu(model)

    def load(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state entries for one tensor of the file: itself, or its (weight, scales) pair."""
        if self.stored or not is_quantized_name(name):
            return {name: tensor}
        amax = None
        if self.row_max is not None and self.quantization.method == "int8":
            amax = self.row_max(name, tensor.float().abs().amax(dim=1))
        weight, scales = quantize_tensor(tensor, self.quantization, self.quantization.scale_dtype(tensor.dtype), amax)
        return {name: weight, name.removesuffix("weight") + "scales": scales}


def _describe(q: Quantization) -> str:
    return f"int4, groups of {q.group_size}" if q.method == "int4" else "int8 per output channel"


def write_quantized(source: str | Path, out: str | Path, quantization: "str | Quantization",
                    dtype: torch.dtype | str | None = None, prefer: str | None = None) -> Path:
    """Quantize the checkpoint folder `source` (either format, tensor by tensor) into the folder
    `out`: params.json, quantization.json, consolidated.safetensors, and the tokenizer files."""
    import shutil

    from safetensors.torch import save_file

    from .loader import find_checkpoint, load_model
    from .tokenizer import TOKENIZER_FILES

    quantization = Quantization.parse(quantization)
    ckpt = find_checkpoint(source, prefer)
    if read_quantization(ckpt.folder) is not None:
        raise CheckpointError(f"{ckpt.folder}: already quantized; quantize the full-precision checkpoint")
    # kernels="torch": no merged projections, whose views of one matrix safetensors would refuse
    model = load_model(source, dtype=dtype, prefer=prefer, quantize=quantization, max_seq_len=1, quiet=True,
                       kernels="torch")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "consolidated.safetensors.partial"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"format": "pt", "quantization": json.dumps(quantization.to_json())})
    (out / "params.json").write_text(json.dumps(ckpt.args().to_params(), indent=2) + "\n")
    (out / CONFIG_FILE).write_text(json.dumps(quantization.to_json(), indent=2) + "\n")
    tmp.replace(out / "consolidated.safetensors")  # last: a crash mid-write leaves no loadable folder
    for name in TOKENIZER_FILES:
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, out / name)
    return out
