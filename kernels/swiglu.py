"""SwiGLU's gate: silu(gate) * up, elementwise (gate = x @ w1ᵀ, up = x @ w3ᵀ).

Reference (mistral/model.py, restated):

    def silu_mul(gate, up):            # gate, up [..., hidden_dim]
        return F.silu(gate) * up       # silu(g) = g * sigmoid(g)

PyTorch runs this as two kernels with a [..., hidden_dim] temporary between them (read gate, write
silu; read silu and up, write the product: 5 passes); fused it is 3. The reference's rounding of
silu(gate) to the input dtype before the product is kept, so the two agree to the last bit on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, check_float, check_out, rows

BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements (16 bytes of bf16 each)


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n_cols, g_stride, u_stride, BLOCK: tl.constexpr):
    """Grid (rows, column blocks). Rows may be strided: gate and up can be the two halves of one
    [rows, 2 * hidden] matmul output (merged w1|w3) without a copy."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * g_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * u_stride + cols, mask=mask, other=0.0).to(tl.float32)
    silu = (g * tl.sigmoid(g)).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu's output dtype
    tl.store(out_ptr + row * n_cols + cols, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)


def silu_mul(
    gate: torch.Tensor,  # [..., hidden_dim]
    up: torch.Tensor,  # [..., hidden_dim], same shape and dtype
    *,
    out: torch.Tensor | None = None,  # [..., hidden_dim], contiguous; written in full
) -> torch.Tensor:
    """silu(gate) * up in one pass, computed in fp32."""
    check_float("gate", gate)
    check_device("gate", gate)
    if up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device:
        raise ValueError(f"up ({up.dtype} {list(up.shape)} on {up.device}) must match gate "
                         f"({gate.dtype} {list(gate.shape)} on {gate.device})")
    out = check_out("out", out, gate.shape, gate.dtype, gate.device)
    if gate.numel():
        g, u = rows(gate), rows(up)  # [rows, hidden] views with unit column stride where possible
        n_rows, n_cols = g.shape
        _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            g, u, out, n_cols, g.stride(0), u.stride(0), BLOCK=BLOCK, num_warps=4)
    return out
