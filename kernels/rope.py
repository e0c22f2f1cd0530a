"""Rotary position embedding of the queries and keys in one launch.

Reference (mistral/model.py, restated): every adjacent pair (x[2i], x[2i+1]) of each head turns as
the complex number x[2i] + i·x[2i+1] by the angle of the token's position (Mistral's interleaved
layout, not Hugging Face's "rotate-half"):

    def apply_rotary_emb(xq, xk, cos, sin):     # xq [B,T,H,D], xk [B,T,Hkv,D], cos/sin [B,T,D/2] fp32
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        def rotate(x):
            x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).type_as(x)
        return rotate(xq), rotate(xk)

Grid: (token, block of heads). The blocks of heads run over the query heads, then the key heads, so a
single launch does all of a token's heads and each program reads its token's cos/sin once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_like, check_out, check_shape, last_dim_contiguous, next_power_of_2

BLOCK_H = 4  # heads per program: at head_dim 128, 1 KiB of bf16 in and out per program


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr,  # [B, T, H | Hkv, D] inputs
    cos_ptr, sin_ptr,  # [B, T, D/2] fp32, the same strides
    q_out_ptr, k_out_ptr,  # [B, T, H | Hkv, D] outputs
    T, n_heads, n_kv_heads, half,  # half = D / 2 pairs per head
    q_sb, q_st, q_sh, k_sb, k_st, k_sh,  # input strides (batch, token, head)
    cs_sb, cs_st,  # cos/sin strides
    qo_sb, qo_st, qo_sh, ko_sb, ko_st, ko_sh,  # output strides (batch, token, head)
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,  # heads per program; next power of two >= D/2
):
    token = tl.program_id(0).to(tl.int64)  # int64: b * batch stride can pass 2**31 in a large batch
    b, t = token // T, token % T
    block = tl.program_id(1)
    n_q_blocks = tl.cdiv(n_heads, BLOCK_H)
    if block < n_q_blocks:
        first, n_rows = block * BLOCK_H, n_heads
        src = q_ptr + b * q_sb + t * q_st
        dst = q_out_ptr + b * qo_sb + t * qo_st
        src_sh, dst_sh = q_sh, qo_sh
    else:
        first, n_rows = (block - n_q_blocks) * BLOCK_H, n_kv_heads
        src = k_ptr + b * k_sb + t * k_st
        dst = k_out_ptr + b * ko_sb + t * ko_st
        src_sh, dst_sh = k_sh, ko_sh

    heads = first + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    pair_mask = pairs < half
    mask = (heads < n_rows)[:, None] & pair_mask[None, :]
    even = heads[:, None] * src_sh + 2 * pairs[None, :]  # [BLOCK_H, BLOCK_P] offsets of x[2i]
    x0 = tl.load(src + even, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + even + 1, mask=mask, other=0.0).to(tl.float32)  # the odd half hits the same cache lines
    c = tl.load(cos_ptr + b * cs_sb + t * cs_st + pairs, mask=pair_mask, other=1.0)[None, :]
    s = tl.load(sin_ptr + b * cs_sb + t * cs_st + pairs, mask=pair_mask, other=0.0)[None, :]
    x0, x1 = x0 * c - x1 * s, x0 * s + x1 * c
    out = heads[:, None] * dst_sh + 2 * pairs[None, :]
    tl.store(dst + out, x0.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + out + 1, x1.to(dst.dtype.element_ty), mask=mask)


def _check(xq, xk, cos, sin):
    check_float("xq", xq)
    check_device("xq", xq)
    check_shape("xq", xq, (None, None, None, None))
    B, T, H, D = xq.shape
    if D % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {D}")
    check_shape("xk", xk, (B, T, None, D))
    check_like("xk", xk, "xq", xq)
    for name, t in (("cos", cos), ("sin", sin)):
        check_shape(name, t, (B, T, D // 2))
        if t.dtype != torch.float32 or t.device != xq.device:
            raise ValueError(f"{name} must be float32 on {xq.device}, got {t.dtype} on {t.device}")


def apply_rotary_emb(
    xq: torch.Tensor,  # [B, T, H, D]
    xk: torch.Tensor,  # [B, T, Hkv, D]
    cos: torch.Tensor,  # [B, T, D/2] fp32, the angles of each token's position
    sin: torch.Tensor,  # [B, T, D/2] fp32
    *,
    out_q: torch.Tensor | None = None,  # [B, T, H, D], contiguous; written in full
    out_k: torch.Tensor | None = None,  # [B, T, Hkv, D]
) -> tuple[torch.Tensor, torch.Tensor]:  # rotated (xq, xk), in their dtype
    """Rotate the interleaved pairs of every query and key head, in one launch."""
    _check(xq, xk, cos, sin)
    out_q = check_out("out_q", out_q, xq.shape, xq.dtype, xq.device)
    out_k = check_out("out_k", out_k, xk.shape, xk.dtype, xk.device)
    B, T, H, D = xq.shape
    Hkv = xk.shape[2]
    if B * T == 0:
        return out_q, out_k
    xq, xk = last_dim_contiguous(xq), last_dim_contiguous(xk)
    cos, sin = cos.contiguous(), sin.contiguous()
    _rotary_kernel[(B * T, triton.cdiv(H, BLOCK_H) + triton.cdiv(Hkv, BLOCK_H))](
        xq, xk, cos, sin, out_q, out_k,
        T, H, Hkv, D // 2,
        *xq.stride()[:3], *xk.stride()[:3],
        cos.stride(0), cos.stride(1),
        *out_q.stride()[:3], *out_k.stride()[:3],
        BLOCK_H=BLOCK_H, BLOCK_P=next_power_of_2(D // 2), num_warps=1 if D <= 64 else 2,
    )
    return out_q, out_k
