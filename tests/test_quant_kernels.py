"""The Triton int8 / int4 matmul kernels (kernels/quant_matmul.py) against the PyTorch reference of
mistral/quantize.py: dequantize, then F.linear. On a machine without a GPU they run in Triton's
interpreter (tests/conftest.py), so the shapes stay small."""

import pytest
import torch
import torch.nn.functional as F

from mistral.quantize import Quantization, dequantize, quantize_tensor

quant_matmul = pytest.importorskip("kernels.quant_matmul")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def layer(q: Quantization, K: int, N: int, dtype: torch.dtype):
    m = q.module(K, N)
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(K + N))
    m.weight, m.scales = quantize_tensor(w.to(dtype), q, dtype)
    return m.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q", [Quantization("int8"), Quantization("int4", 32), Quantization("int4", 128)],
                         ids=["int8", "int4-32", "int4-128"])
@pytest.mark.parametrize("M, K, N", [(1, 256, 72), (3, 384, 64)])  # N and K not multiples of the blocks
def test_kernel_equals_dequantize_then_linear(q, dtype, M, K, N):
    m = layer(q, K, N, dtype)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    ref = F.linear(x.double(), dequantize(m, torch.float64))
    if q.method == "int8":
        out = quant_matmul.int8_matmul(x, m.weight, m.scales)
    else:
        out = quant_matmul.int4_matmul(x, m.weight, m.scales, q.group_size)
    assert out.dtype == dtype and out.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # fp32 accumulation; bf16: the output's rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_bad_inputs_get_clear_errors():
    m = layer(Quantization("int4", 32), 64, 16, torch.float32)
    x = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be torch.int8"):
        quant_matmul.int8_matmul(x, m.weight, m.scales)
    with pytest.raises(ValueError, match="group_size 48 must be even and divide K = 64"):
        quant_matmul.int4_matmul(x, m.weight, m.scales, 48)
    with pytest.raises(ValueError, match=r"scales has shape \[16, 2\], expected \[16, 1\]"):
        quant_matmul.int4_matmul(x, m.weight, m.scales, 64)
