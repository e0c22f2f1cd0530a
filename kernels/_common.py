"""What every kernel wrapper needs: input checks with clear messages, and launch settings.

Two facts shape all the kernels in this package:

* They must also run under Triton's interpreter (`TRITON_INTERPRET=1`, set before `triton` is first
  imported) on CPU tensors, where bf16 arithmetic is done on the raw bits and is wrong. So every
  kernel converts what it loads to fp32 at once, computes in fp32 (each `tl.dot` too) and converts
  only when it stores. On a GPU this costs little: every kernel but prefill attention is bound by
  memory, and fp32 `tl.dot` runs on the tensor cores as tf32 (see `dot_precision`), at half the
  bf16 rate; that is the price prefill attention pays for one code path on GPU and interpreter.
* `tl.dot` needs every dimension >= 16 on the GPU in older triton releases (3.6 and 3.9 pad smaller
  M and N themselves; the interpreter accepts anything), so tiles that feed a dot are padded to 16.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Read when the kernels are decorated, which is when triton decides too.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

MIN_DOT = 16  # the smallest M, N and K that every triton release's tl.dot accepts on NVIDIA GPUs


def check_device(name: str, t: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter; say so otherwise."""
    if t.device.type == "cuda" or (INTERPRET and t.device.type == "cpu"):
        return
    raise ValueError(
        f"{name} is on {t.device}: the Triton kernels need CUDA tensors, or CPU tensors with "
        "TRITON_INTERPRET=1 set before triton is first imported"
    )


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """`shape` may hold None for a dimension that can be anything."""
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} has shape {list(t.shape)}, expected {want}")


def check_out(name: str, out: torch.Tensor | None, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """The caller's output buffer (checked), or a fresh one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != torch.device(device):
        raise ValueError(f"{name} must be a {dtype} tensor of shape {list(shape)} on {device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return out


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any strides but the last: a unit stride there keeps loads vectorised."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def rows(t: torch.Tensor) -> torch.Tensor:
    """[..., dim] as a [rows, dim] tensor with unit column stride; a view whenever one exists."""
    t = last_dim_contiguous(t)
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:  # leading dims that no single row stride describes
        return t.reshape(-1, t.shape[-1])


def num_warps(block: int) -> int:
    """Enough warps that each thread holds a handful of elements of a `block`-wide row."""
    return 1 if block <= 128 else 2 if block <= 512 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def dot_precision(dtype: torch.dtype) -> str:
    """How tl.dot multiplies fp32 operands.

    bf16 and fp16 values converted to fp32 are exact in tf32 (7 and 10 stored mantissa bits against
    tf32's 10), so the tf32 tensor cores lose nothing on Q·Kᵀ (the kernels scale the scores after the
    dot, not q before it, to keep it so); fp32 inputs keep full fp32 products ("ieee").
    """
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)  # asked on every decode step
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter runs one program at a time: fewer, larger programs are faster


next_power_of_2 = triton.next_power_of_2


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """t must have ref's dtype and device."""
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} ({t.dtype} on {t.device}) must match {ref_name} ({ref.dtype} on {ref.device})")


def check_positions(input_pos: torch.Tensor, B: int, device: torch.device) -> None:
    """input_pos: [B] int64 on `device`, the first new token's position in each row."""
    check_shape("input_pos", input_pos, (B,))
    if input_pos.dtype != torch.int64 or input_pos.device != device:
        raise ValueError(f"input_pos must be int64 on {device}, got {input_pos.dtype} on {input_pos.device}")


def check_attention(xq, keys, values, input_pos, sliding_window) -> None:
    """The arguments of `attention(xq, keys, values, input_pos, sliding_window)`, checked."""
    check_float("xq", xq)
    check_device("xq", xq)
    check_shape("xq", xq, (None, None, None, None))
    B, T, H, D = xq.shape
    check_shape("keys", keys, (B, None, None, D))
    check_shape("values", values, tuple(keys.shape))
    Hkv, L = keys.shape[1], keys.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"xq has {H} heads, which is not a multiple of the {Hkv} key/value heads")
    if L == 0:
        raise ValueError("keys and values hold no positions (L = 0)")
    check_like("keys", keys, "xq", xq)
    check_like("values", values, "xq", xq)
    check_positions(input_pos, B, xq.device)
    if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                       or sliding_window <= 0):
        raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")


@triton.jit
def online_softmax_update(m, l, acc, s, v, PRECISION: tl.constexpr):
    """One key tile of flash attention's online softmax, for both attention kernels.

    m [R] running max of each row's scores, l [R] running sum of exp2(score - m), acc [R, D] running
    sum of exp2(score - m) * value; s [R, N] this tile's scores in log2 units, -inf where invisible;
    v [N, D] its values. Returns the updated (m, l, acc). A row with nothing visible yet keeps
    m = -inf and adds nothing (its max is taken as 0 for the exponentials).
    """
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)  # rescales what was summed under the old max
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l, acc
