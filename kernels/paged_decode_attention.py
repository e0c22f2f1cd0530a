"""Decode attention over a paged KV cache: one new token per row, its keys and values in blocks of a
shared pool, found through the row's block table.

Reference (decode_attention.py's, with the cache gathered first): row b's positions live in

    k_pool[block_table[b, j // block_size], j % block_size, kv_head]     (and v_pool alike)

and its query at position pos = input_pos[b] sees positions j <= pos (and j > pos - sliding_window).
Gathering a row's blocks into a [Hkv, L, D] copy and calling the contiguous kernel computes the same;
this kernel reads the pool in place instead, so a step costs the rows' own positions, once.

* GQA packing, as in decode_attention.py: the G query heads of one key/value head are one [G, D]
  tile (padded to 16 rows, the smallest tl.dot), so each key/value tile serves all of them.
* A tile is BLOCK_N consecutive positions of the row; each position's block is looked up in the table,
  so the block size need not be a multiple of the tile (nor a power of two).
* Only table entries of visible positions are read: blocks past a row's end, or other rows' blocks, are
  never touched (a block may be in several rows' tables: a shared prompt prefix).
* Split-KV, as in decode_attention.py and with its plan and merge kernel: the number of splits comes
  from shapes (the table's width), so a CUDA graph replays the same grid, and each row cuts its own
  visible positions into that many chunks; batch 1 with 8 key/value heads still fills the GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (MIN_DOT, check_device, check_float, check_out, check_positions, dot_precision, last_dim_contiguous,
                      next_power_of_2, online_softmax_update)
from .decode_attention import _merge_kernel, plan_splits

BLOCK_N = 64  # positions per loop step


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr,  # q [B, 1, H, D]; k, v [blocks, bs, Hkv, D]; table [B, n]; pos [B]
    out_ptr,  # [B, 1, H, D] when there is one split
    part_out_ptr, part_lse_ptr,  # [B, H, splits, D] and [B, H, splits] fp32 partial results, otherwise
    qk_scale, window, block_size, table_len, n_splits, min_chunk,
    q_sb, q_sh, k_sn, k_so, k_sh, v_sn, v_so, v_sh, t_sb, o_sb, o_sh, po_sb, po_sh, po_ss, pl_sb, pl_sh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    pos = tl.load(pos_ptr + b)
    end = tl.minimum(pos + 1, table_len * block_size)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(pos - window + 1, 0)
    begin = first - first % BLOCK_N
    # this row's visible tiles cut into n_splits chunks of whole tiles, as decode_attention.py cuts them
    chunk = tl.maximum(tl.cdiv(tl.cdiv(end - begin, n_splits), BLOCK_N) * BLOCK_N, min_chunk)
    lo = begin + split * chunk
    hi = tl.minimum(lo + chunk, end)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(lo, hi, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)  # positions
        n_mask = (n < hi) & (n >= first)
        block = tl.load(table_ptr + b * t_sb + n // block_size, mask=n_mask, other=0).to(tl.int64)  # [BLOCK_N]
        slot = n % block_size
        k_rows = k_ptr + block * k_sn + slot * k_so + kv_head * k_sh  # [BLOCK_N] pointers to each position's key
        kt = tl.load(k_rows[None, :] + d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v_rows = v_ptr + block * v_sn + slot * v_so + kv_head * v_sh
        v = tl.load(v_rows[:, None] + d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        m, l, acc = online_softmax_update(m, l, acc, s, v, PRECISION)

    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty split (past the row's end) gives 0
    mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
        tl.store(part_out_ptr + b * po_sb + heads[:, None] * po_sh + split * po_ss + d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + b * pl_sb + heads * pl_sh + split, lse, mask=g_mask)
    else:
        tl.store(out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def paged_decode_attention(
    xq: torch.Tensor,  # [B, 1, H, D] the new token's queries
    k_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D], already holding the new keys
    v_pool: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    block_table: torch.Tensor,  # [B, n] int32/int64: row b's position j is in block block_table[b, j // block_size]
    input_pos: torch.Tensor,  # [B] int64, the new token's position in each row
    sliding_window: int | None = None,
    *,
    out: torch.Tensor | None = None,  # [B, 1, H, D], contiguous; written in full
    num_splits: int | None = None,  # None: enough to fill the GPU (decode_attention.plan_splits)
    block_n: int = BLOCK_N,
) -> torch.Tensor:  # [B, 1, H, D]
    """Attention of one new token per row over its first input_pos[b] + 1 positions, read through its block table."""
    for name, t in (("xq", xq), ("k_pool", k_pool), ("v_pool", v_pool)):
        check_float(name, t)
        check_device(name, t)
    if xq.dim() != 4 or xq.shape[1] != 1:
        raise ValueError(f"xq must be [B, 1, H, D], got {list(xq.shape)}")
    B, _, H, D = xq.shape
    if k_pool.dim() != 4 or k_pool.shape[3] != D or v_pool.shape != k_pool.shape:
        raise ValueError(f"k_pool and v_pool must both be [num_blocks, block_size, Hkv, {D}], "
                         f"got {list(k_pool.shape)} and {list(v_pool.shape)}")
    block_size, Hkv = k_pool.shape[1], k_pool.shape[2]
    if H % Hkv:
        raise ValueError(f"{H} query heads do not share {Hkv} key/value heads evenly")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_table must be [{B}, n] int32 or int64, got {list(block_table.shape)} {block_table.dtype}")
    check_device("block_table", block_table)
    check_positions(input_pos, B, xq.device)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be positive or None, got {sliding_window}")
    if block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {MIN_DOT}, got {block_n}")
    out = check_out("out", out, xq.shape, xq.dtype, xq.device)
    if B == 0:
        return out
    if k_pool.stride(3) != 1 or v_pool.stride(3) != 1 or xq.stride(3) != 1:
        raise ValueError("xq, k_pool and v_pool must be contiguous in their last dimension")
    input_pos, block_table = input_pos.contiguous(), last_dim_contiguous(block_table)  # read as pos[b], table[b, j]
    group = H // Hkv
    table_len = block_table.shape[1]
    splits, min_chunk = plan_splits(B, Hkv, table_len * block_size, xq.device, num_splits, block_n)
    block_d = max(next_power_of_2(D), MIN_DOT)
    if splits > 1:
        part_out = torch.empty(B, H, splits, D, dtype=torch.float32, device=xq.device)
        part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=xq.device)
    else:  # one split writes the output itself; the partial buffers are never touched
        part_out, part_lse = out.view(B, H, 1, D), out.view(B, H, 1, D)[..., 0]
    _paged_decode_kernel[(B, Hkv, splits)](
        xq, k_pool, v_pool, block_table, input_pos, out, part_out, part_lse,
        math.log2(math.e) / math.sqrt(D), sliding_window or 0, block_size, table_len, splits, min_chunk,
        xq.stride(0), xq.stride(2), *k_pool.stride()[:3], *v_pool.stride()[:3], block_table.stride(0),
        out.stride(0), out.stride(2), *part_out.stride()[:3], *part_lse.stride()[:2],
        GROUP=group, HEAD_DIM=D, BLOCK_G=max(next_power_of_2(group), MIN_DOT), BLOCK_N=block_n,
        BLOCK_D=block_d, HAS_WINDOW=sliding_window is not None, SPLIT=splits > 1,
        PRECISION=dot_precision(xq.dtype), num_warps=4, num_stages=2,
    )
    if splits > 1:
        _merge_kernel[(B, H)](
            part_out, part_lse, out, splits,
            *part_out.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(2),
            HEAD_DIM=D, BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
