"""Rotary position embedding of the queries and keys in one launch, optionally writing the rotated
keys (and the values) straight into the KV cache.

Reference (mistral/model.py, restated): every adjacent pair (x[2i], x[2i+1]) of each head turns as
the complex number x[2i] + i·x[2i+1] by the angle of the token's position (Mistral's interleaved
layout, not Hugging Face's "rotate-half"):

    def apply_rotary_emb(xq, xk, cos, sin):     # xq [B,T,H,D], xk [B,T,Hkv,D], cos/sin [B,T,D/2] fp32
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        def rotate(x):
            x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
            return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).flatten(-2).type_as(x)
        return rotate(xq), rotate(xk)

Grid: (token, block of heads). The blocks of heads run over the query heads, then the key heads (and
with the cache write, then the value heads, which are only copied), so a single launch does all of a
token's heads and each program reads its token's cos/sin once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (check_device, check_float, check_like, check_out, check_positions, check_shape,
                      last_dim_contiguous, next_power_of_2)

BLOCK_H = 4  # heads per program: at head_dim 128, 1 KiB of bf16 in and out per program


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, v_ptr,  # [B, T, H | Hkv, D] inputs (v only when TO_CACHE)
    cos_ptr, sin_ptr,  # [B, T, D/2] fp32, the same strides
    q_out_ptr, k_out_ptr, v_out_ptr,  # [B, T, H, D] rotated queries; keys/values: [B, T, Hkv, D] or the cache
    pos_ptr,  # [B] int64, where row b's first token goes in the cache (TO_CACHE only)
    T, n_heads, n_kv_heads, half,  # half = D / 2 pairs per head
    q_sb, q_st, q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh,  # input strides (batch, token, head)
    cs_sb, cs_st,  # cos/sin strides
    qo_sb, qo_st, qo_sh, ko_sb, ko_st, ko_sh, vo_sb, vo_st, vo_sh,  # output strides (batch, token|position, head)
    TO_CACHE: tl.constexpr,  # keys and values go to their cache slots at position pos[b] + t
    BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr,  # heads per program; next power of two >= D/2
):
    token = tl.program_id(0).to(tl.int64)  # int64: b * batch stride can pass 2**31 in a large cache
    b, t = token // T, token % T
    block = tl.program_id(1)
    n_q_blocks = tl.cdiv(n_heads, BLOCK_H)
    n_kv_blocks = tl.cdiv(n_kv_heads, BLOCK_H)

    dst_t = t  # the query (and, without the cache, key) rows keep their token index
    if TO_CACHE:
        dst_t = tl.load(pos_ptr + b) + t
    rotate = True
    if block < n_q_blocks:
        first, n_rows = block * BLOCK_H, n_heads
        src = q_ptr + b * q_sb + t * q_st
        dst = q_out_ptr + b * qo_sb + t * qo_st
        src_sh, dst_sh = q_sh, qo_sh
    elif block < n_q_blocks + n_kv_blocks:
        first, n_rows = (block - n_q_blocks) * BLOCK_H, n_kv_heads
        src = k_ptr + b * k_sb + t * k_st
        dst = k_out_ptr + b * ko_sb + dst_t * ko_st
        src_sh, dst_sh = k_sh, ko_sh
    else:  # values (TO_CACHE only): copied, not rotated
        first, n_rows = (block - n_q_blocks - n_kv_blocks) * BLOCK_H, n_kv_heads
        src = v_ptr + b * v_sb + t * v_st
        dst = v_out_ptr + b * vo_sb + dst_t * vo_st
        src_sh, dst_sh = v_sh, vo_sh
        rotate = False

    heads = first + tl.arange(0, BLOCK_H)
    pairs = tl.arange(0, BLOCK_P)
    pair_mask = pairs < half
    mask = (heads < n_rows)[:, None] & pair_mask[None, :]
    even = heads[:, None] * src_sh + 2 * pairs[None, :]  # [BLOCK_H, BLOCK_P] offsets of x[2i]
    x0 = tl.load(src + even, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(src + even + 1, mask=mask, other=0.0).to(tl.float32)  # the odd half hits the same cache lines
    if rotate:
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


def _launch(xq, xk, xv, cos, sin, q_out, k_out, v_out, pos, k_out_strides, v_out_strides):
    B, T, H, D = xq.shape
    Hkv = xk.shape[2]
    if B * T == 0:
        return
    xq, xk = last_dim_contiguous(xq), last_dim_contiguous(xk)
    cos, sin = cos.contiguous(), sin.contiguous()
    to_cache = xv is not None
    if not to_cache:  # no value blocks in the grid: the value arguments are never read
        xv, v_out, v_out_strides = xk, k_out, k_out_strides
    xv = last_dim_contiguous(xv)
    n_blocks = triton.cdiv(H, BLOCK_H) + triton.cdiv(Hkv, BLOCK_H) * (2 if to_cache else 1)
    _rotary_kernel[(B * T, n_blocks)](
        xq, xk, xv, cos, sin, q_out, k_out, v_out, pos if pos is not None else cos,
        T, H, Hkv, D // 2,
        *xq.stride()[:3], *xk.stride()[:3], *xv.stride()[:3],
        cos.stride(0), cos.stride(1),
        *q_out.stride()[:3], *k_out_strides, *v_out_strides,
        TO_CACHE=to_cache, BLOCK_H=BLOCK_H, BLOCK_P=next_power_of_2(D // 2), num_warps=1 if D <= 64 else 2,
    )


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
    _launch(xq, xk, None, cos, sin, out_q, out_k, None, None, out_k.stride()[:3], None)
    return out_q, out_k


def apply_rotary_emb_to_cache(
    xq: torch.Tensor,  # [B, T, H, D]
    xk: torch.Tensor,  # [B, T, Hkv, D]
    xv: torch.Tensor,  # [B, T, Hkv, D]
    cos: torch.Tensor,  # [B, T, D/2] fp32
    sin: torch.Tensor,  # [B, T, D/2] fp32
    cache_k: torch.Tensor,  # [max_batch >= B, Hkv, max_seq_len, D], written in place
    cache_v: torch.Tensor,  # [max_batch >= B, Hkv, max_seq_len, D], written in place
    input_pos: torch.Tensor,  # [B] int64: row b's token t goes to position input_pos[b] + t
    *,
    out_q: torch.Tensor | None = None,
) -> torch.Tensor:  # the rotated queries [B, T, H, D]
    """`apply_rotary_emb` followed by `KVCache.update`, in one launch: the rotated keys are never
    written anywhere but their cache slot.

    Positions are not checked against the cache length (that would cost a host sync): the caller
    keeps input_pos[b] + T <= max_seq_len, as it must for `KVCache.update`.
    """
    _check(xq, xk, cos, sin)
    B, T, Hkv, D = xk.shape
    check_shape("xv", xv, tuple(xk.shape))
    for name, cache in (("cache_k", cache_k), ("cache_v", cache_v)):
        check_shape(name, cache, (None, Hkv, None, D))
        if cache.shape[0] < B or cache.dtype != xk.dtype or cache.device != xk.device or cache.stride(-1) != 1:
            raise ValueError(f"{name} must hold at least {B} rows of {xk.dtype} on {xk.device} with a "
                             f"contiguous last dimension, got {cache.dtype} {list(cache.shape)} on {cache.device}")
    check_like("xv", xv, "xk", xk)
    check_positions(input_pos, B, xq.device)
    out_q = check_out("out_q", out_q, xq.shape, xq.dtype, xq.device)

    def slot_strides(cache):  # (batch, position, head): a token's slot is cache[b, :, pos + t]
        return cache.stride(0), cache.stride(2), cache.stride(1)

    _launch(xq, xk, xv, cos, sin, out_q, cache_k, cache_v, input_pos, slot_strides(cache_k), slot_strides(cache_v))
    return out_q
