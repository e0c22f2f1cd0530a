"""Prefill attention: many new tokens per row over the KV cache, causal, grouped-query, with an
optional sliding window. FlashAttention-style: tiles of keys stream past a tile of queries and the
softmax is computed online, so the [T, L] score matrix never exists in memory.

Reference (mistral/model.py's `attention`, restated): row b's query t sits at position
p = input_pos[b] + t and sees cache positions j with j <= p (and j > p - sliding_window):

    scores[t, j] = xq[b, t, h] · keys[b, h // G, j] / sqrt(D)          G = H // Hkv
    out[b, t, h] = softmax over the visible j of scores[t, :]  @  values[b, h // G, :]

The cache may already hold earlier positions (input_pos > 0: a prompt continued, or chunked
prefill); those are visible to every new query. Grid: (query tile, batch row x query head). A
program visits only the key tiles its queries can see: from the window start of its first query to
the position of its last, so causal attention does half the work of full attention, and a sliding
window bounds it. The query heads that share a key/value head read the same K/V tiles, which
stay in L2 between them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import MIN_DOT, online_softmax_update, check_attention, check_out, dot_precision, last_dim_contiguous, next_power_of_2

BLOCK_M = 64  # queries per program
BLOCK_N = 64  # cache positions per loop step


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr,  # q, out [B, T, H, D]; k, v [B, Hkv, L, D]; pos [B] int64
    qk_scale, window, T, L, n_heads,  # qk_scale = log2(e) / sqrt(D)
    q_sb, q_st, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_st, o_sh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    # The last query tiles see the most keys: launch them first so the tail of the grid is short.
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = bh % n_heads
    kv_head = h // GROUP

    start = tl.load(pos_ptr + b)  # position of this row's first new token
    t = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    t_mask = t < T
    q_pos = start + t  # [BLOCK_M]
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * q_sb + t[:, None] * q_st + h * q_sh + d[None, :],
                mask=t_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]

    # Key tiles this query tile can see: [lo, hi).
    hi = tl.minimum(start + tl.minimum(m_block * BLOCK_M + BLOCK_M, T), L)  # last query's position + 1
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(start + m_block * BLOCK_M - window + 1, 0)  # first query's window start
        lo = lo - lo % BLOCK_N
    k_base = k_ptr + b * k_sb + kv_head * k_sh
    v_base = v_ptr + b * v_sb + kv_head * v_sh

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each query's scores
    l = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        kt = tl.load(k_base + n[None, :] * k_sl + d[:, None],
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        # Masking every tile, not only the diagonal ones, costs a few ALU ops per score in a kernel
        # whose loop is bound by the two dots; it keeps one simple loop.
        visible = n_mask[None, :] & (n[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            visible &= n[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(v_base + n[:, None] * v_sl + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        m, l, acc = online_softmax_update(m, l, acc, s, v, PRECISION)

    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + b * o_sb + t[:, None] * o_st + h * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=t_mask[:, None] & d_mask[None, :])


def prefill_attention(
    xq: torch.Tensor,  # [B, T, H, D] queries of the new tokens
    keys: torch.Tensor,  # [B, Hkv, L, D] the cache (any strides but the last), already holding the new keys
    values: torch.Tensor,  # [B, Hkv, L, D]
    input_pos: torch.Tensor,  # [B] int64, position of each row's first new token
    sliding_window: int | None = None,
    *,
    out: torch.Tensor | None = None,  # [B, T, H, D], contiguous; written in full
    block_m: int | None = None,
    block_n: int = BLOCK_N,
) -> torch.Tensor:  # [B, T, H, D]
    """Causal grouped-query attention of T new tokens per row over the cache."""
    check_attention(xq, keys, values, input_pos, sliding_window)
    B, T, H, D = xq.shape
    Hkv, L = keys.shape[1], keys.shape[2]
    out = check_out("out", out, xq.shape, xq.dtype, xq.device)
    if B * T == 0:
        return out
    if block_m is None:  # short prompts: a smaller tile, but never below the smallest tl.dot
        block_m = min(BLOCK_M, max(next_power_of_2(T), MIN_DOT))
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < MIN_DOT or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= {MIN_DOT}, got {block}")
    xq, keys, values = last_dim_contiguous(xq), last_dim_contiguous(keys), last_dim_contiguous(values)
    _prefill_kernel[(triton.cdiv(T, block_m), B * H)](
        xq, keys, values, input_pos, out,
        math.log2(math.e) / math.sqrt(D), sliding_window or 0, T, L, H,
        *xq.stride()[:3], *keys.stride()[:3], *values.stride()[:3], *out.stride()[:3],
        GROUP=H // Hkv, HEAD_DIM=D,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(next_power_of_2(D), MIN_DOT),
        HAS_WINDOW=sliding_window is not None, PRECISION=dot_precision(xq.dtype),
        num_warps=8 if block_m * max(D, 64) >= 64 * 128 else 4, num_stages=2,
    )
    return out
