"""The names of what a checkpoint can be: its two on-disk formats, the floating-point dtypes it
stores (and the model computes in), and the weight-only quantizations of its linear layers. One
table each.

Imports no torch, so that the command line can offer the choices without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

CONSOLIDATED, HF = "consolidated", "hf"  # Mistral's params.json + consolidated.safetensors; Hugging Face's
FORMATS = (CONSOLIDATED, HF)


@dataclass(frozen=True)
class DType:
    bytes: int  # per value
    safetensors: str  # the name a safetensors header gives it
    aliases: tuple[str, ...]  # other names `as_dtype` accepts


DTYPES: dict[str, DType] = {  # torch's name -> the rest; the command line offers them in this order
    "float32": DType(4, "F32", ("fp32", "float")),
    "bfloat16": DType(2, "BF16", ("bf16",)),
    "float16": DType(2, "F16", ("fp16", "half")),
}
_NAMES = {alias: name for name, d in DTYPES.items() for alias in (name, *d.aliases)}


def as_dtype(dtype):
    """A torch dtype from itself, its name (`bfloat16`, `torch.bfloat16`) or an alias (`bf16`)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, _NAMES[str(dtype).removeprefix("torch.")])
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}") from None


def dtype_name(dtype) -> str:
    """`torch.bfloat16` -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


# Weight-only quantization methods (quantize.py) -> bytes per stored weight, the scales aside.
QUANTIZATIONS: dict[str, float] = {"int8": 1, "int4": 0.5}
INT4_GROUP_SIZES = (32, 64, 128, 256)  # int4: weights per scale along the input dimension
# What loading can be asked to quantize to (`quantize=`, --quantize): a method, int4 in its default
# groups of 32, or in groups of 128 (Quantization.parse reads any int4-<group size>).
QUANTIZE_ON_LOAD = (*QUANTIZATIONS, "int4-128")
