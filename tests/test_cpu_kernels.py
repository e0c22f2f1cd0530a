"""The hand-written CPU mat-vec kernels (kernels/cpu): int8/int4 and their use by the quantized
layers, fp32/bf16 and their use by the "cpu" ops backend.

Two references, both independent of the kernels' code:
- exact: the activation quantized per block of 32 as the kernels' docstring states (scale
  max|x| / 127, round half to even), integer dot products per block, summed in float64; the kernels
  must equal it to fp32 rounding, on every instruction set this CPU can run (AVX-512 VNNI, AVX2 and
  the portable path, each built alone and called through ctypes) and through the PyTorch op;
- dequantize-then-F.linear: the kernels stay within the stated bound of the activation's rounding.
"""

import ctypes
import shutil

import pytest
import torch
import torch.nn.functional as F

import kernels.cpu as cpu_kernels
from mistral.args import ModelArgs
from mistral.loader import load_model
from mistral.make_random import make_random
from mistral.quantize import (Int4Linear, Int8Linear, Quantization, dequantize, quantize_tensor,
                              unpack_int4, use_cpu_kernels)

pytestmark = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build kernels/cpu")

METHODS = [Quantization("int8"), Quantization("int4", 32), Quantization("int4", 128)]
IDS = ["int8", "int4-32", "int4-128"]


def layer(q: Quantization, in_features=256, out_features=40, dtype=torch.float32, seed=0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    m = q.module(in_features, out_features)
    m.weight, m.scales = quantize_tensor(w, q, dtype)
    return m


def integer_weights(m) -> tuple[torch.Tensor, torch.Tensor]:
    """(the integers [N, K] as float64, the scale of each [N, K] as float64)."""
    if isinstance(m, Int8Linear):
        return m.weight.double(), m.scales.double()[:, None].expand(m.out_features, m.in_features)
    return unpack_int4(m.weight).double(), m.scales.double().repeat_interleave(m.group_size, dim=1)


def exact_reference(x: torch.Tensor, m) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [M, N] as the kernels define it, in float64; Σ|terms| [M, N], the scale of fp32 rounding)."""
    xf = x.float().reshape(-1, m.in_features)
    M, K = xf.shape
    blocks = xf.view(M, K // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)  # [M, K/32, 1]
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))  # fp32, as the C++
    xq = torch.round(blocks * inv).double()  # half to even
    d = (amax / 127).double()  # [M, K/32, 1]
    q, s = integer_weights(m)
    qb, sb = q.view(-1, K // 32, 32), s.view(-1, K // 32, 32)[..., 0]  # [N, K/32, 32], [N, K/32]
    dots = torch.einsum("mbk,nbk->mnb", xq, qb)  # exact integers
    terms = dots * d[None, :, :, 0].transpose(0, 1) * sb[None]  # [M, N, K/32]
    return terms.sum(-1), terms.abs().sum(-1)


def assert_matches_exact(out: torch.Tensor, x: torch.Tensor, m) -> None:
    ref, size = exact_reference(x, m)
    rounding = 2**-8 if out.dtype == torch.bfloat16 else 1e-5  # bf16: the output's rounding
    out = out.double().reshape(ref.shape)
    assert ((out - ref).abs() <= rounding * (size + ref.abs()) + 1e-30).all()


@pytest.mark.parametrize("q", METHODS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 5])  # the kernels take rows four at a time: 5 = 4 + 1
def test_op_equals_the_exact_int8_activation_reference(q, dtype, rows):
    m = layer(q, dtype=dtype)
    x = torch.randn(1, rows, 256).to(dtype)
    op = cpu_kernels.int8_matvec(x, m.weight, m.scales) if q.method == "int8" else \
        cpu_kernels.int4_matvec(x, m.weight, m.scales, q.group_size)
    assert op.shape == (1, rows, 40) and op.dtype == dtype
    assert_matches_exact(op, x, m)


@pytest.mark.parametrize("q", METHODS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("K, N", [(256, 40), (352, 39)])
def test_a_row_gets_the_same_bits_alone_and_in_any_batch(q, dtype, K, N):
    """Each row's activation is quantized and reduced on its own (activation rows four at a time
    against a weight row; a single row against four weight rows at a time, the rest one by one):
    a sequence's result must not depend on its company in a decode batch."""
    if q.group_size and K % q.group_size:
        pytest.skip(f"groups of {q.group_size} do not divide K = {K}")
    m = layer(q, in_features=K, out_features=N, dtype=dtype)
    x = torch.randn(7, K).to(dtype)
    op = (lambda x: cpu_kernels.int8_matvec(x, m.weight, m.scales)) if q.method == "int8" else \
        (lambda x: cpu_kernels.int4_matvec(x, m.weight, m.scales, q.group_size))
    batch = op(x)
    for i in range(7):
        assert torch.equal(op(x[i:i + 1]), batch[i:i + 1])
    assert torch.equal(op(x[3:6]), batch[3:6])


@pytest.mark.parametrize("q", METHODS, ids=IDS)
def test_op_stays_within_the_activation_rounding_bound_of_dequantize_then_linear(q):
    """|y - x Wᵀ| <= Σ_k |W[n, k]| · max|x over k's block| / 254 (half a step of each block), plus fp32 rounding."""
    m = layer(q, in_features=512, out_features=64)
    x = torch.randn(2, 512) * torch.linspace(0.01, 10, 512)  # blocks of very different sizes
    W = dequantize(m, torch.float64)
    ref = F.linear(x.double(), W)
    block_max = x.abs().view(2, -1, 32).amax(-1).double().repeat_interleave(32, dim=1)  # [2, K]
    bound = (block_max / 254) @ W.abs().T
    out = (cpu_kernels.int8_matvec(x, m.weight, m.scales) if q.method == "int8" else
           cpu_kernels.int4_matvec(x, m.weight, m.scales, q.group_size)).double()
    assert ((out - ref).abs() <= bound * (1 + 1e-4) + 1e-5 * ref.abs()).all()
    assert (out - ref).abs().max() > 0  # the activation really is rounded: this is not F.linear


def test_a_zero_block_and_extreme_inputs():
    m = layer(Quantization("int8"), in_features=128, out_features=16)
    x = torch.randn(1, 128) * 1e30
    x[0, :32] = 0.0  # amax 0: the block contributes nothing, no division by zero
    out = cpu_kernels.int8_matvec(x, m.weight, m.scales)
    assert torch.isfinite(out).all()
    assert_matches_exact(out, x, m)


@pytest.mark.parametrize("call, message", [
    (lambda m, x: cpu_kernels.int8_matvec(x[:, :100].contiguous(), m.weight, m.scales), "multiple of 32"),
    (lambda m, x: cpu_kernels.int8_matvec(x.half(), m.weight, m.scales), "float32 or bfloat16"),
    (lambda m, x: cpu_kernels.int8_matvec(x, m.weight.float(), m.scales), "weight must be int8"),
    (lambda m, x: cpu_kernels.int8_matvec(x, m.weight, m.scales[:-1]), "scales has shape"),
    (lambda m, x: cpu_kernels.int8_matvec(x, m.weight[:, :64].contiguous(), m.scales), "weight has shape"),
    (lambda m, x: cpu_kernels.int8_matvec(x.t().contiguous().t(), m.weight, m.scales), "contiguous"),
    (lambda m, x: cpu_kernels.int4_matvec(x, m.weight, m.scales, 48), "group_size 48"),
])
def test_bad_input_is_a_value_error_naming_it(call, message):
    m = layer(Quantization("int8"), in_features=128, out_features=16)
    x = torch.randn(3, 128)
    with pytest.raises(ValueError, match=message):
        call(m, x)


# --- every instruction set this CPU runs, each built alone --------------------------------------

ISAS = {"avx512-vnni": ("-march=native", "avx512_vnni"), "avx2": ("-march=x86-64-v3", "avx2"),
        "scalar": ("-march=x86-64", None),
        # int4's high nibbles without GFNI's affine byte map (a shift and a mask)
        "avx512-vnni-no-gfni": ("-march=native -mno-gfni", "avx512_vnni")}


def cpu_has(flag: str | None) -> bool:
    if flag is None:
        return True
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return flag in line.split()


def build_alone(folder, source: str, isas: dict) -> dict:
    """{instruction set: `source` compiled for it alone (no PyTorch), loaded with ctypes}, for those
    of `isas` ({name: (-march flag, /proc/cpuinfo flag or None)}) this CPU runs."""
    import platform
    import subprocess

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the instruction-set builds are x86-64's")
    libs = {}
    for name, (march, flag) in isas.items():
        if not cpu_has(flag):
            continue
        out = folder / f"{name}.so"
        cmd = cpu_kernels.compile_command(cpu_kernels.compiler(), [cpu_kernels.HERE / source], out,
                                          flags=("-O2", *march.split(), "-std=c++20", "-fPIC", "-shared"), torch_headers=False)
        subprocess.run(cmd, check=True, capture_output=True)
        libs[name] = ctypes.CDLL(str(out))
    return libs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    libs = build_alone(tmp_path_factory.mktemp("isa"), "quant_matvec.cpp", ISAS)
    for name, lib in libs.items():
        lib.mfs_isa.restype = ctypes.c_char_p
        lib.mfs_workspace_bytes.restype = ctypes.c_size_t
        lib.mfs_workspace_bytes.argtypes = [ctypes.c_int64, ctypes.c_int64]
        lib.mfs_matvec.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                   ctypes.c_void_p]
        assert lib.mfs_isa().decode() == name.removesuffix("-no-gfni")
    return libs


def call(lib, m, x: torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    N = m.out_features
    out = torch.empty(M, N, dtype=x.dtype)
    ws = torch.empty(lib.mfs_workspace_bytes(M, K) + 64, dtype=torch.uint8)
    aligned = (ws.data_ptr() + 63) // 64 * 64
    fmt, group = (0, 0) if isinstance(m, Int8Linear) else (1, m.group_size)
    lib.mfs_matvec(fmt, x.data_ptr(), 0 if x.dtype == torch.float32 else 1, M, K, m.weight.data_ptr(),
                   m.scales.data_ptr(), group, out.data_ptr(), N, aligned)
    return out


@pytest.mark.parametrize("isa", list(ISAS))
@pytest.mark.parametrize("q", METHODS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# K past the vector steps (avx512: int8 64 inputs, int4 128) by 32, 64 and 96 inputs, and past the
# 16-block window of int4's scales; N: weight rows not a multiple of the 4 a single row takes at a time
@pytest.mark.parametrize("K, N", [(384, 37), (352, 6), (320, 3), (288, 9), (1056, 5), (1152, 7)])
def test_every_instruction_set_equals_the_exact_reference(built, isa, q, dtype, K, N):
    if isa not in built:
        pytest.skip(f"this CPU does not run {isa}")
    if q.group_size and K % q.group_size:
        pytest.skip(f"groups of {q.group_size} do not divide K = {K}")
    m = layer(q, in_features=K, out_features=N, dtype=dtype, seed=2)
    for rows in (1, 2, 4, 6):
        x = torch.randn(rows, K, generator=torch.Generator().manual_seed(rows)).to(dtype)
        assert_matches_exact(call(built[isa], m, x), x, m)


# --- the quantized layers and the loader ---------------------------------------------------------


@pytest.mark.parametrize("q", METHODS[:2], ids=IDS[:2])
def test_layers_send_decode_rows_to_the_kernels_eager_and_compiled(q):
    from torch._inductor.utils import run_and_get_code

    m = layer(q, dtype=torch.bfloat16)
    assert use_cpu_kernels(m).cpu_matvec
    x = torch.randn(1, 2, 256).to(torch.bfloat16)
    op = "mistral_cpu.int8_matvec" if q.method == "int8" else "mistral_cpu.int4_matvec"
    with torch.profiler.profile() as prof:
        eager = m(x)
    assert any(e.name.replace("::", ".") == op for e in prof.events())
    compiled, code = run_and_get_code(torch.compile(m, fullgraph=True), x)
    assert op in "".join(code).replace("::", ".")
    assert torch.equal(eager, compiled)
    assert_matches_exact(eager, x, m)
    # a prefill's many rows still take dequantize-then-GEMM: no activation rounding
    xs = torch.randn(1, 32, 256).to(torch.bfloat16)
    torch.testing.assert_close(m(xs), F.linear(xs, dequantize(m, torch.bfloat16)))


def test_loader_wires_the_kernels_and_torch_turns_them_off(tmp_path):
    args = ModelArgs(dim=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, norm_eps=1e-5,
                     vocab_size=512, rope_theta=1e6)
    folder = make_random(tmp_path / "m", args, "consolidated", "bfloat16", seed=1, tokenizer=False)
    tokens = torch.arange(1, 25)[None]  # 24 rows: past the decode rows, a prefill
    for spec, kind in (("int8", Int8Linear), ("int4", Int4Linear)):
        on = load_model(folder, quantize=spec, max_seq_len=32, kernels="auto")  # "cpu" here
        layers = [m for m in on.modules() if isinstance(m, kind)]
        assert layers and all(m.cpu_matvec for m in layers)
        assert all(getattr(m, "cpu_packed", None) is None for m in layers)  # no second copy of int4 weights
        assert on.ops.name == "cpu"
        off = load_model(folder, quantize=spec, max_seq_len=32, kernels="torch")
        assert not any(m.cpu_matvec for m in off.modules() if isinstance(m, kind))
        # the prefill path is the same GEMM either way: the same logits, bit for bit
        assert torch.equal(on(tokens), off(tokens))


# --- fp32 / bf16 weights: kernels.cpu.matvec and the "cpu" backend -------------------------------


def assert_float_matches(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Products and sums in fp32, in some order: within fp32 rounding of Σ|x w|, then the output's rounding."""
    ref = x.double().reshape(-1, x.shape[-1]) @ w.double().T
    size = x.double().reshape(-1, x.shape[-1]).abs() @ w.double().abs().T
    out = out.double().reshape(ref.shape)
    output_rounding = 2**-8 if x.dtype == torch.bfloat16 else 0.0
    assert ((out - ref).abs() <= 1e-5 * size + output_rounding * ref.abs() + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("K", [256, 200])  # 200: a tail past the vector loops
def test_float_matvec_equals_the_float64_product(dtype, rows, K):
    w = torch.randn(37, K).to(dtype)
    x = torch.randn(1, rows, K).to(dtype)
    out = cpu_kernels.matvec(x, w)
    assert out.shape == (1, rows, 37) and out.dtype == dtype
    assert_float_matches(out, x, w)
    for i in range(rows):  # each row on its own: the same bits alone as in the batch
        assert torch.equal(cpu_kernels.matvec(x[:, i:i + 1].contiguous(), w), out[:, i:i + 1])


@pytest.mark.parametrize("call, message", [
    (lambda x, w: cpu_kernels.matvec(x.half(), w), "float32 or bfloat16"),
    (lambda x, w: cpu_kernels.matvec(x, w[:, :64].contiguous()), "weight has shape"),
    (lambda x, w: cpu_kernels.matvec(x, w.t().contiguous().t()), "contiguous"),
])
def test_float_matvec_bad_input_is_a_value_error_naming_it(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(2, 128), torch.randn(16, 128))


@pytest.fixture(scope="module")
def built_float(tmp_path_factory):
    isas = {"avx512": ("-march=native", "avx512bw"), "avx2": ("-march=x86-64-v3", "avx2"), "scalar": ("-march=x86-64", None)}
    libs = build_alone(tmp_path_factory.mktemp("float-isa"), "float_matvec.cpp", isas)
    for name, lib in libs.items():
        lib.mfs_float_isa.restype = ctypes.c_char_p
        lib.mfs_float_matvec.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                         ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
        assert lib.mfs_float_isa().decode() == name
    return libs


@pytest.mark.parametrize("isa", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_float_matvec_on_every_instruction_set(built_float, isa, dtype):
    if isa not in built_float:
        pytest.skip(f"this CPU does not run {isa}")
    w = torch.randn(29, 216).to(dtype)  # 216: past the 32- and 16-wide loops, a scalar tail
    for rows in (1, 2, 4, 6):
        x = torch.randn(rows, 216).to(dtype)
        out, xf = torch.empty(rows, 29, dtype=dtype), torch.empty(rows, 216)
        built_float[isa].mfs_float_matvec(x.data_ptr(), 0 if dtype == torch.float32 else 1, rows, 216, w.data_ptr(),
                                          out.data_ptr(), 29, xf.data_ptr())
        assert_float_matches(out, x, w)


def test_cpu_backend_sends_eager_decode_rows_to_the_kernel():
    from torch._inductor.utils import run_and_get_code

    from mistral.ops import CPU_OPS, get_ops

    assert get_ops("cpu") is CPU_OPS and get_ops("auto", "cpu") is CPU_OPS
    x, w = torch.randn(1, 2, 128).to(torch.bfloat16), torch.randn(64, 128).to(torch.bfloat16)
    with torch.profiler.profile() as prof:
        eager = CPU_OPS.linear(x, w)
    assert any(e.name == "mistral_cpu::matvec" for e in prof.events())
    # compiled: inductor's fused reduction of cpu_linear, faster inside a compiled step (ops.py)
    compiled, code = run_and_get_code(torch.compile(CPU_OPS.linear, fullgraph=True), x, w)
    assert "mistral_cpu.matvec" not in "".join(code).replace("::", ".")
    torch.testing.assert_close(compiled, eager)
    many = torch.randn(1, 9, 128).to(torch.bfloat16)  # a prefill: PyTorch's GEMM
    assert torch.equal(CPU_OPS.linear(many, w), F.linear(many, w))


def test_cpu_backend_is_refused_off_the_cpu_in_one_line():
    from mistral.ops import get_ops

    with pytest.raises(ValueError, match="kernels='cpu' is for the CPU"):
        get_ops("cpu", "cuda")


# --- decode attention -----------------------------------------------------------------------------


def attention_float64(q, k, v, pos, window):
    """Causal GQA written out in float64: row b's token t at pos[b] + t sees keys pos - window < j <= pos."""
    B, T, H, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            p = int(pos[b]) + t
            j = torch.arange(L)
            seen = (j <= p) & ((j > p - window) if window else True)
            for h in range(H):
                g = h // (H // Hkv)
                s = (k[b, g].double() @ q[b, t, h].double()) / D**0.5
                w = torch.softmax(s.masked_fill(~seen, float("-inf")), 0)
                out[b, t, h] = w @ v[b, g].double()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B, T, H, Hkv, L, D, window", [
    (1, 1, 12, 4, 37, 128, 0),   # a 0.5B decode step
    (1, 1, 32, 8, 300, 128, 0),  # 7B's heads
    (3, 2, 8, 2, 50, 64, 16),    # batch rows at different positions, a sliding window
    (2, 4, 4, 4, 20, 48, 0),     # no grouping; D a multiple of the 16 lanes but not of 32
    (2, 3, 6, 3, 9, 20, 3),      # D below the lane width
])
def test_decode_attention_equals_float64_attention(dtype, B, T, H, Hkv, L, D, window):
    g = torch.Generator().manual_seed(B * 100 + L)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((B, T, H, D), (B, Hkv, L, D), (B, Hkv, L, D)))
    pos = torch.randint(0, L - T + 1, (B,), generator=g)  # slots past a row's tokens are stale: masked
    out = cpu_kernels.decode_attention(q, k, v, pos, window)
    assert out.dtype == dtype and out.shape == q.shape
    ref = attention_float64(q, k, v, pos, window)
    tol = 2e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_decode_attention_reads_strided_keys_as_they_are():
    """A slice of a longer cache (model.KVCache's rows and positions): no copy needed, same result."""
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(4, 2, 40, 16, generator=g), torch.randn(4, 2, 40, 16, generator=g)
    q, pos = torch.randn(2, 1, 4, 16, generator=g), torch.tensor([5, 17])
    out = cpu_kernels.decode_attention(q, k[1:3, :, :24], v[1:3, :, :24], pos, 0)
    torch.testing.assert_close(out.double(), attention_float64(q, k[1:3, :, :24], v[1:3, :, :24], pos, 0),
                               rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, window", [(1, 0), (2, 0), (1, 5), (3, 7)])
def test_paged_decode_attention_equals_float64_attention_over_the_gathered_blocks(dtype, T, window):
    """Ragged block tables over one pool: rows with different numbers of blocks, a block shared by two
    rows (a cached prefix), table entries past a row's tokens pointing at the scratch block 0."""
    g = torch.Generator().manual_seed(T * 10 + window)
    bs, Hkv, H, D, blocks = 4, 2, 6, 24, 9
    k_pool, v_pool = (torch.randn(blocks, bs, Hkv, D, generator=g).to(dtype) for _ in range(2))
    table = torch.tensor([[3, 7, 0, 0, 0],    # positions 0..7
                          [3, 5, 8, 2, 0],    # shares block 3 with row 0
                          [1, 0, 0, 0, 0],    # one block
                          [6, 4, 2, 8, 1]])   # every entry used
    pos = torch.tensor([8 - T, 15 - T, 1, 20 - T])
    q = torch.randn(4, T, H, D, generator=g).to(dtype)
    out = cpu_kernels.decode_attention(q, k_pool, v_pool, pos, window, table)
    gathered = [pool[table].reshape(4, -1, Hkv, D).transpose(1, 2) for pool in (k_pool, v_pool)]  # [B, Hkv, 20, D]
    ref = attention_float64(q, *gathered, pos, window)
    tol = 2e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    assert torch.equal(out, cpu_kernels.decode_attention(q, *(x.contiguous() for x in gathered), pos, window))


def test_paged_decode_attention_refuses_a_table_that_leaves_the_pool():
    pool = torch.randn(3, 4, 2, 8)
    q, pos = torch.randn(1, 1, 4, 8), torch.tensor([5])
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] = 3 is not a block of the pool \(3 blocks\)"):
        cpu_kernels.decode_attention(q, pool, pool, pos, 0, torch.tensor([[1, 3]]))
    with pytest.raises(ValueError, match=r"block_table must be int64 \[1, n\]"):
        cpu_kernels.decode_attention(q, pool, pool, pos, 0, torch.tensor([[1, 2]], dtype=torch.int32))
    with pytest.raises(ValueError, match="k and v must be"):
        cpu_kernels.decode_attention(q, pool, torch.randn(3, 4, 2, 4), pos, 0, torch.tensor([[1, 2]]))


def test_the_cpu_backend_attends_with_it_in_decode_and_compiled():
    from mistral.model import attention as reference
    from mistral.ops import CPU_OPS

    q, k, v = torch.randn(2, 1, 8, 32), torch.randn(2, 2, 30, 32), torch.randn(2, 2, 30, 32)
    pos = torch.tensor([4, 29])
    ref = reference(q, k, v, pos, None)
    torch.testing.assert_close(CPU_OPS.attention(q, k, v, pos, None), ref, rtol=1e-5, atol=1e-6)
    compiled = torch.compile(CPU_OPS.attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, pos, None), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(compiled(q, k, v, pos, None), cpu_kernels.decode_attention(q, k, v, pos, 0))
    one = torch.tensor([7])  # one position for every row, as the model allows
    torch.testing.assert_close(CPU_OPS.attention(q, k, v, one, None), reference(q, k, v, one, None), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    (((1, 1, 6, 8), (1, 4, 5, 8), (1, 4, 5, 8), [0], 0), "must be a multiple of Hkv"),
    (((1, 1, 4, 8), (1, 2, 5, 8), (1, 2, 6, 8), [0], 0), "k and v must be"),
    (((1, 1, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8), [0, 1], 0), "pos must be int64 [1]"),
    (((1, 1, 4, 8), (1, 2, 5, 8), (1, 2, 5, 8), [0], -1), "window must be >= 0"),
])
def test_decode_attention_names_what_is_wrong(args, message):
    q, k, v, pos, window = args
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        cpu_kernels.decode_attention(torch.randn(q), torch.randn(k), torch.randn(v), torch.tensor(pos), window)


def test_the_engine_on_the_cpu_backend_reads_its_paged_cache_in_place(tmp_path, monkeypatch):
    """The "cpu" backend's engine cache hands attention the pool's blocks (`Pages`), not a gathered
    copy: two rows decoding together, the second over a prompt prefix cached by the first (blocks
    shared), get the logits the "torch" backend gets from gathered keys, eager and compiled."""
    from mistral.args import preset
    from mistral.engine import Engine, GenerationParams
    from mistral.kv_cache import Pages

    folder = make_random(tmp_path / "w", preset("small"), "consolidated", "float32", seed=5)
    calls = []
    real = cpu_kernels.decode_attention

    def counted(q, k, v, pos, window, block_table=None):
        calls.append(block_table is not None)
        return real(q, k, v, pos, window, block_table)

    monkeypatch.setattr(cpu_kernels, "decode_attention", counted)
    shared = list(range(100, 140))  # 40 tokens: two whole blocks of 16 to reuse
    prompts = [[1, *shared, 7], [1, *shared, 9, 11, 13]]
    seen = {}
    for name, kernels, compile in (("torch", "torch", False), ("cpu", "cpu", False), ("cpu compiled", "cpu", True)):
        model = load_model(folder, kernels=kernels, max_seq_len=96, quiet=True)
        engine = Engine(model, max_batch=2, max_seq_len=96, compile=compile)
        assert engine.cache.in_place == (kernels == "cpu")
        logits, step = seen.setdefault(name, []), engine.decode_step

        def keep(*args, step=step, logits=logits):
            out = step(*args)
            logits.append(out[0].clone())
            return out

        engine.decode_step = keep
        greedy = GenerationParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        first = engine.add(prompts[0], greedy, lambda event: None)
        engine.step()  # the first prompt is read and its blocks registered: the second reuses them
        second = engine.add(prompts[1], greedy, lambda event: None)
        engine.run_until_idle()
        assert second.cached >= 32 and first.generated == second.generated == 6
        if kernels == "cpu":
            assert isinstance(engine.cache.pages(0)[0], Pages)
    assert calls and all(calls)  # every decode attention read the pool through the block table
    for name in ("cpu", "cpu compiled"):
        assert len(seen[name]) == len(seen["torch"])
        for got, want in zip(seen[name], seen["torch"]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
