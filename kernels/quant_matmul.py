"""Weight-only quantized matmul for a few rows (decode): int8 per output channel, int4 in groups.

Reference (mistral/quantize.py, restated):

    int8:  y = x @ (weight.float() * scales[:, None]).T             weight int8 [N, K], scales [N]
    int4:  W[n, k] = (nibble[n, k] - 8) * scales[n, k // group]     weight uint8 [N, K/2]: input 2j in
           y = x @ W.T                                              the low nibble of byte j, 2j+1 high

At batch 1 a matmul is a read of its weights, so these kernels read the integer weights once and
never store a dequantized copy: each program owns BLOCK_N output channels of one row of x and walks
K, converting each loaded weight block to fp32 in registers. Rows of x beyond the first re-read the
same weights, from L2 while M is small; for a prefill-sized M the caller dequantizes and uses a GEMM.
Accumulation is in fp32 (also what keeps the interpreter's arithmetic right, see _common.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_shape

BLOCK_N = 64  # output channels per program
BLOCK_K = 128  # inputs per step of the K loop (int4: 64 bytes of each weight row)
MAX_ROWS = 16  # beyond this, re-reading the weights per row costs more than a dequantize + GEMM


@triton.jit
def _int8_matmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), M)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1).to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + m * K + k, mask=k < K, other=0.0).to(tl.float32)  # [BLOCK_K]
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :],
                    mask=(n[:, None] < N) & (k[None, :] < K), other=0).to(tl.float32)  # [BLOCK_N, BLOCK_K]
        acc += tl.sum(w * x[None, :], axis=1)
    s = tl.load(s_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * N + n, (acc * s).to(out_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _int4_matmul_kernel(x_ptr, w_ptr, s_ptr, out_ptr, N, K, GROUP: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N), M). Byte j of a row holds inputs 2j and 2j+1, which share a group."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1).to(tl.int64)
    n_mask = n[:, None] < N
    row = n[:, None].to(tl.int64)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte index within the row
        j_mask = j < K // 2
        x_even = tl.load(x_ptr + m * K + 2 * j, mask=j_mask, other=0.0).to(tl.float32)  # [BLOCK_K / 2]
        x_odd = tl.load(x_ptr + m * K + 2 * j + 1, mask=j_mask, other=0.0).to(tl.float32)
        b = tl.load(w_ptr + row * (K // 2) + j[None, :], mask=n_mask & j_mask[None, :], other=0).to(tl.int32)
        low = ((b & 0xF) - 8).to(tl.float32)  # [BLOCK_N, BLOCK_K / 2]
        high = ((b >> 4) - 8).to(tl.float32)
        s = tl.load(s_ptr + row * (K // GROUP) + (2 * j[None, :]) // GROUP,
                    mask=n_mask & j_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum((low * x_even[None, :] + high * x_odd[None, :]) * s, axis=1)
    tl.store(out_ptr + m * N + n, acc.to(out_ptr.dtype.element_ty), mask=n < N)


def _check(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    check_float("x", x)
    check_device("x", x)
    if weight.dtype != dtype or weight.device != x.device or scales.device != x.device:
        raise ValueError(f"weight must be {dtype} on {x.device} with its scales, got {weight.dtype} on {weight.device}")
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [M, K] matrix, got {list(x.shape)}")
    if not (weight.is_contiguous() and scales.is_contiguous()):
        raise ValueError("weight and scales must be contiguous")
    return torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)


def int8_matmul(
    x: torch.Tensor,  # [M, K] float, contiguous
    weight: torch.Tensor,  # [N, K] int8
    scales: torch.Tensor,  # [N] float
) -> torch.Tensor:  # [M, N] in x's dtype
    out = _check(x, weight, scales, torch.int8)
    M, K = x.shape
    N = weight.shape[0]
    check_shape("weight", weight, (N, K))
    check_shape("scales", scales, (N,))
    if M and N:
        _int8_matmul_kernel[(triton.cdiv(N, BLOCK_N), M)](x, weight, scales, out, N, K,
                                                           BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out


def int4_matmul(
    x: torch.Tensor,  # [M, K] float, contiguous
    weight: torch.Tensor,  # [N, K/2] uint8, two inputs a byte
    scales: torch.Tensor,  # [N, K / group_size] float
    group_size: int,
) -> torch.Tensor:  # [M, N] in x's dtype
    out = _check(x, weight, scales, torch.uint8)
    M, K = x.shape
    N = weight.shape[0]
    if group_size % 2 or K % group_size:
        raise ValueError(f"group_size {group_size} must be even and divide K = {K}")
    check_shape("weight", weight, (N, K // 2))
    check_shape("scales", scales, (N, K // group_size))
    if M and N:
        _int4_matmul_kernel[(triton.cdiv(N, BLOCK_N), M)](x, weight, scales, out, N, K, GROUP=group_size,
                                                           BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out
