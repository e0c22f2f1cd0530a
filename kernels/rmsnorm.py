"""RMSNorm, and the residual add fused with the RMSNorm that follows it.

Reference (mistral/model.py, restated):

    def rms_norm(x, weight, eps):                       # x [..., dim], weight [dim]
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return normed.type_as(x) * weight

    def add_rms_norm(x, residual, weight, eps):         # returns (rms_norm(h), h)
        h = x + residual
        return rms_norm(h, weight, eps), h

One program normalises one row. The row is read once and each output is written once: unfused,
`add_rms_norm` reads x, residual, writes h, then reads h again and writes the output (5 passes over
[rows, dim] against 4 here), and PyTorch's RMSNorm alone makes several passes through fp32 temporaries.
The intermediate roundings of the reference (h in its dtype, `normed.type_as(x)` before the weight)
are repeated, so on a GPU the result matches the reference bit for bit up to the order of the sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_out, check_shape, next_power_of_2, num_warps, rows


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, weight_ptr, out_ptr, h_ptr,  # x, residual [rows, dim]; weight [dim]; out, h [rows, dim]
    x_stride, res_stride, out_stride, h_stride,  # row strides (columns are contiguous)
    dim, eps,
    ADD_RESIDUAL: tl.constexpr,  # h = x + residual first, and store it
    BLOCK: tl.constexpr,  # next power of two >= dim: the whole row in one tile
):
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride can pass 2**31 at long prefills
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(h_ptr.dtype.element_ty)  # rounded to h's dtype, as `x + residual` is
        tl.store(h_ptr + row * h_stride + cols, h, mask=mask)
        x = h.to(tl.float32)
        in_dtype = h_ptr.dtype.element_ty
    else:
        in_dtype = x_ptr.dtype.element_ty
    mean_sq = tl.sum(x * x, axis=0) / dim  # padding lanes hold 0 and add nothing
    normed = (x * tl.rsqrt(mean_sq + eps)).to(in_dtype).to(tl.float32)  # `normed.type_as(x)`
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x2, res2, weight, eps, out2, h2):
    n_rows, dim = x2.shape
    if n_rows == 0:
        return
    block = next_power_of_2(dim)
    _rms_norm_kernel[(n_rows,)](
        x2, res2 if res2 is not None else x2, weight, out2, h2 if h2 is not None else out2,
        x2.stride(0), res2.stride(0) if res2 is not None else 0, out2.stride(0),
        h2.stride(0) if h2 is not None else 0,
        dim, eps,
        ADD_RESIDUAL=res2 is not None, BLOCK=block, num_warps=num_warps(block),
    )


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    check_float("x", x)
    check_float("weight", weight)
    check_device("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension")
    check_shape("weight", weight, (x.shape[-1],))
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")


def rms_norm(
    x: torch.Tensor,  # [..., dim]
    weight: torch.Tensor,  # [dim]
    eps: float,
    *,
    out: torch.Tensor | None = None,  # [..., dim], contiguous; written in full
) -> torch.Tensor:  # [..., dim] in x's dtype promoted with weight's
    """x / sqrt(mean(x²) + eps) * weight, computed in fp32."""
    _check(x, weight)
    out = check_out("out", out, x.shape, torch.promote_types(x.dtype, weight.dtype), x.device)
    _launch(rows(x), None, weight.contiguous(), float(eps), out.view(-1, x.shape[-1]), None)
    return out


def add_rms_norm(
    x: torch.Tensor,  # [..., dim]
    residual: torch.Tensor,  # [..., dim]
    weight: torch.Tensor,  # [dim]
    eps: float,
    *,
    out: torch.Tensor | None = None,  # the normed output, [..., dim]
    h_out: torch.Tensor | None = None,  # the new residual stream h = x + residual, [..., dim]
) -> tuple[torch.Tensor, torch.Tensor]:  # (rms_norm(h, weight, eps), h)
    """The residual add and the next RMSNorm in one pass over the row."""
    _check(x, weight)
    check_float("residual", residual)
    check_shape("residual", residual, tuple(x.shape))
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    h_dtype = torch.promote_types(x.dtype, residual.dtype)
    h_out = check_out("h_out", h_out, x.shape, h_dtype, x.device)
    out = check_out("out", out, x.shape, torch.promote_types(h_dtype, weight.dtype), x.device)
    dim = x.shape[-1]
    _launch(rows(x), rows(residual), weight.contiguous(), float(eps), out.view(-1, dim), h_out.view(-1, dim))
    return out, h_out
