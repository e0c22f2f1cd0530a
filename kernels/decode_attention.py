"""Decode attention: one new token per row over the KV cache, grouped-query heads, split-KV.

Reference (mistral/model.py's `attention` with T = 1, restated): row b's query sits at position
pos = input_pos[b] and sees cache positions j <= pos (and j > pos - sliding_window):

    scores = xq[b, 0, h] · keys[b, h // G, j] / sqrt(D)       for the visible j;  G = H // Hkv
    out[b, 0, h] = softmax(scores) @ values[b, h // G, visible j]

Decoding reads the whole visible cache to produce one vector per head: the work is memory-bound,
and the kernel is laid out so that every cached byte is read once, by a GPU that is kept busy:

* GQA packing: the G query heads that share a key/value head are one [G, D] tile (padded to 16
  rows, the smallest tl.dot), so each K/V tile loaded serves all G heads.
* Split-KV ("flash-decoding"): a row's positions are cut into `num_splits` chunks handled by
  separate programs, so that batch 1 with 8 KV heads still fills 132 SMs. Each chunk returns its
  softmax-weighted sum and the log-sum-exp of its scores; a second kernel merges the chunks.
  The number of splits comes from shapes (the grid is fixed, so a CUDA graph can replay it), but
  each row cuts its own visible positions, read on the device, into that many chunks (of at least
  MIN_CHUNK positions in the default plan): at batch 1 on an H100, a row at 4k positions in a 32k
  cache keeps 16 of the 33 splits busy, where cutting the whole cache view kept 4.
* Per-row lengths: a program reads only positions below input_pos[b] + 1 (and inside the window),
  so a row costs what its length costs even when the cache view `L` is much longer.

Scores live in base 2 (scaled by log2(e)) so the softmax uses exp2, the GPU's native exponential.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import MIN_DOT, online_softmax_update, check_attention, check_out, dot_precision, last_dim_contiguous, next_power_of_2, num_sms

BLOCK_N = 64  # cache positions per loop step
MIN_CHUNK = 256  # fewest positions worth a split of their own (in the default plan)
MAX_SPLITS = 64  # bounds the merge kernel's [splits, D] tile


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr,  # q [B, 1, H, D]; k, v [B, Hkv, L, D]; pos [B] int64
    out_ptr,  # [B, 1, H, D] when there is one split
    part_out_ptr, part_lse_ptr,  # [B, H, splits, D] and [B, H, splits] fp32 partial results, otherwise
    qk_scale, window, L, n_splits, min_chunk,  # qk_scale = log2(e) / sqrt(D); min_chunk: fewest positions per split
    q_sb, q_sh, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl, o_sb, o_sh, po_sb, po_sh, po_ss, pl_sb, pl_sh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    pos = tl.load(pos_ptr + b)  # this row's query position: it sees positions first..pos
    end = tl.minimum(pos + 1, L)
    first = 0  # the first visible position
    if HAS_WINDOW:
        first = tl.maximum(pos - window + 1, 0)
    begin = first - first % BLOCK_N  # start on a tile boundary, mask the rest
    # This row's visible tiles, cut into n_splits chunks of whole tiles (at least min_chunk positions,
    # so that a short row uses fewer splits and the others find nothing to do).
    chunk = tl.maximum(tl.cdiv(tl.cdiv(end - begin, n_splits), BLOCK_N) * BLOCK_N, min_chunk)
    lo = begin + split * chunk
    hi = tl.minimum(lo + chunk, end)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + g  # the query heads served by this key/value head
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * q_sb + heads[:, None] * q_sh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_G, BLOCK_D]
    k_base = k_ptr + b * k_sb + kv_head * k_sh
    v_base = v_ptr + b * v_sb + kv_head * v_sh

    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of exp2(score - m) * value
    for tile in range(lo, hi, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        n_mask = (n < hi) & (n >= first)
        kt = tl.load(k_base + n[None, :] * k_sl + d[:, None],
                     mask=n_mask[None, :] & d_mask[:, None], other=0.0).to(tl.float32)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(n_mask[None, :], s, float("-inf"))
        v = tl.load(v_base + n[:, None] * v_sl + d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
        m, l, acc = online_softmax_update(m, l, acc, s, v, PRECISION)

    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # an empty split (past the row's end) gives 0
    mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))  # log2 of this split's softmax mass
        tl.store(part_out_ptr + b * po_sb + heads[:, None] * po_sh + split * po_ss + d[None, :], out, mask=mask)
        tl.store(part_lse_ptr + b * pl_sb + heads * pl_sh + split, lse, mask=g_mask)
    else:
        tl.store(out_ptr + b * o_sb + heads[:, None] * o_sh + d[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,  # [B, H, splits, D], [B, H, splits] fp32 -> [B, 1, H, D]
    n_splits, po_sb, po_sh, po_ss, pl_sb, pl_sh, o_sb, o_sh,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Each split's output is its own softmax average; weighting them by their softmax mass
    2^lse (relative to the largest) and renormalising gives the softmax over all positions."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < n_splits
    lse = tl.load(part_lse_ptr + b * pl_sb + h * pl_sh + s, mask=s_mask, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # empty splits weigh 0
    parts = tl.load(part_out_ptr + b * po_sb + h * po_sh + s[:, None] * po_ss + d[None, :],
                    mask=s_mask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    total = tl.sum(w, 0)
    out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * o_sb + h * o_sh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def plan_splits(B: int, Hkv: int, L: int, device: torch.device, num_splits: int | None, block_n: int) -> tuple[int, int]:
    """(number of splits, fewest positions per split). Both depend only on shapes, never on
    input_pos (a device tensor): reading it would cost a host sync and break graph capture; the
    kernel divides each row's own length among the splits. An explicit `num_splits` is taken as
    it is (chunks as short as one tile); the default plan aims at about two programs per SM with
    no chunk shorter than MIN_CHUNK positions."""
    if num_splits is None:
        num_splits, min_chunk = min(triton.cdiv(2 * num_sms(device), B * Hkv), triton.cdiv(L, MIN_CHUNK)), MIN_CHUNK
    else:
        min_chunk = block_n
    return max(1, min(num_splits, MAX_SPLITS, triton.cdiv(L, block_n))), min_chunk


def decode_attention(
    xq: torch.Tensor,  # [B, 1, H, D] the new token's queries
    keys: torch.Tensor,  # [B, Hkv, L, D] the cache (any strides but the last), already holding the new key
    values: torch.Tensor,  # [B, Hkv, L, D]
    input_pos: torch.Tensor,  # [B] int64, the new token's position in each row
    sliding_window: int | None = None,
    *,
    out: torch.Tensor | None = None,  # [B, 1, H, D], contiguous; written in full
    num_splits: int | None = None,  # None: enough to fill the GPU
    block_n: int = BLOCK_N,
) -> torch.Tensor:  # [B, 1, H, D]
    """Attention of one new token per row over its first input_pos[b] + 1 cache positions."""
    check_attention(xq, keys, values, input_pos, sliding_window)
    B, T, H, D = xq.shape
    if T != 1:
        raise ValueError(f"decode_attention takes one token per row, got xq of shape {list(xq.shape)}")
    Hkv, L = keys.shape[1], keys.shape[2]
    out = check_out("out", out, xq.shape, xq.dtype, xq.device)
    if B == 0:
        return out
    if block_n < MIN_DOT or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= {MIN_DOT}, got {block_n}")
    xq, keys, values = last_dim_contiguous(xq), last_dim_contiguous(keys), last_dim_contiguous(values)

    group = H // Hkv
    splits, min_chunk = plan_splits(B, Hkv, L, xq.device, num_splits, block_n)
    block_d = max(next_power_of_2(D), MIN_DOT)
    if splits > 1:
        part_out = torch.empty(B, H, splits, D, dtype=torch.float32, device=xq.device)
        part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=xq.device)
    else:  # one split writes the output itself; the partial buffers are never touched
        part_out, part_lse = out.view(B, H, 1, D), out.view(B, H, 1, D)[..., 0]
    _decode_kernel[(B, Hkv, splits)](
        xq, keys, values, input_pos, out, part_out, part_lse,
        math.log2(math.e) / math.sqrt(D), sliding_window or 0, L, splits, min_chunk,
        xq.stride(0), xq.stride(2), *keys.stride()[:3], *values.stride()[:3], out.stride(0), out.stride(2),
        *part_out.stride()[:3], *part_lse.stride()[:2],
        GROUP=group, HEAD_DIM=D,
        BLOCK_G=max(next_power_of_2(group), MIN_DOT), BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_WINDOW=sliding_window is not None, SPLIT=splits > 1, PRECISION=dot_precision(xq.dtype),
        num_warps=4, num_stages=2,
    )
    if splits > 1:
        _merge_kernel[(B, H)](
            part_out, part_lse, out, splits,
            *part_out.stride()[:3], *part_lse.stride()[:2], out.stride(0), out.stride(2),
            HEAD_DIM=D, BLOCK_S=next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
