"""The Triton kernels against independent PyTorch references, and the model run on them.

Without a GPU, conftest.py switches on Triton's interpreter, which runs the kernels on CPU tensors;
it is slow, so these shapes are tiny (but odd: non-power-of-two widths, lengths 1, 17 and 300). Every
output buffer is pre-filled with NaN, so a test also proves that each element was written; cache
positions that a row must not see are NaN too, so reading them shows. The tests marked `gpu` repeat
the checks at Mistral-7B sizes in bf16, and check that the Triton kernels are what actually ran.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from kernels.decode_attention import decode_attention  # noqa: E402
from kernels.prefill_attention import prefill_attention  # noqa: E402
from kernels.rmsnorm import add_rms_norm, rms_norm  # noqa: E402
from kernels.rope import apply_rotary_emb  # noqa: E402
from kernels.swiglu import silu_mul  # noqa: E402
from mistral import model as reference  # noqa: E402  (TORCH_OPS: the plain PyTorch definitions)
from mistral.args import ModelArgs  # noqa: E402
from mistral.loader import load_model  # noqa: E402
from mistral.make_random import make_random  # noqa: E402
from mistral.ops import triton_ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

CPU = not torch.cuda.is_available()
DEVICE = "cpu" if CPU else "cuda"
# |kernel - reference| <= atol + rtol * |reference|. A bf16 ulp is 2**-7 relative at worst, and the
# kernels repeat the reference's roundings to bf16 (two in a row in rms_norm), but the interpreter
# truncates where PyTorch and the GPU round to nearest: rtol 2e-2 is those two roundings.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=2e-2)}
DTYPES = [torch.float32, torch.bfloat16]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(dtype=dtype, device=DEVICE)


def poisoned(shape, dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert not actual.isnan().any(), f"{actual.isnan().sum()} of {actual.numel()} output elements never written"
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# ---------------------------------------------------------------------------------------------
# RMSNorm, residual add + RMSNorm
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (3, 17, 100)], ids=str)
def test_rms_norm(shape, dtype):
    x, weight = randn(*shape, dtype=dtype, seed=1), randn(shape[-1], dtype=dtype, seed=2)
    out = rms_norm(x, weight, 1e-5, out=poisoned(shape, dtype))
    assert_close(out, reference.rms_norm(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 48), (3, 17, 100)], ids=str)
def test_add_rms_norm(shape, dtype):
    x, residual = randn(*shape, dtype=dtype, seed=1), randn(*shape, dtype=dtype, seed=2)
    weight = randn(shape[-1], dtype=dtype, seed=3)
    normed, h = add_rms_norm(x, residual, weight, 1e-5, out=poisoned(shape, dtype), h_out=poisoned(shape, dtype))
    expected_normed, expected_h = reference.add_rms_norm(x, residual, weight, 1e-5)
    assert_close(h, expected_h, dtype)
    assert_close(normed, expected_normed, dtype)


def test_rms_norm_strided_rows_and_columns():
    """The last position of each row (model(last_only=True)), and every other column."""
    h = randn(3, 5, 64, seed=4)
    weight = randn(64, seed=5)
    assert_close(rms_norm(h[:, -1:], weight, 1e-5), reference.rms_norm(h[:, -1:], weight, 1e-5), torch.float32)
    assert_close(rms_norm(h[..., ::2], weight[::2], 1e-5), reference.rms_norm(h[..., ::2], weight[::2], 1e-5),
                 torch.float32)


# ---------------------------------------------------------------------------------------------
# SwiGLU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 300), (17, 1100)], ids=str)  # 1100: two programs, a ragged tail
def test_silu_mul(shape, dtype):
    gate, up = randn(*shape, dtype=dtype, scale=6.0, seed=1), randn(*shape, dtype=dtype, seed=2)  # sigmoid's tails
    out = silu_mul(gate, up, out=poisoned(shape, dtype))
    assert_close(out, F.silu(gate.float()).to(dtype).float() * up.float(), dtype)


# ---------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------


def rotate_complex(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Independent reference: pairs (x[2i], x[2i+1]) as complex numbers times e^(i·angle), in fp64.
    x [B, T, heads, D], angles [B, T, D/2]."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)


def rotary_inputs(B, T, H, Hkv, D, dtype, theta=1e6):
    positions = torch.tensor([3, 250][:B], device=DEVICE)[:, None] + torch.arange(T, device=DEVICE)  # [B, T]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float64, device=DEVICE) / D)
    angles = positions[..., None].double() * inv_freq  # [B, T, D/2]
    xq, xk = randn(B, T, H, D, dtype=dtype, seed=1), randn(B, T, Hkv, D, dtype=dtype, seed=2)
    return xq, xk, angles.cos().float(), angles.sin().float(), angles


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, H, Hkv, D", [(1, 4, 2, 16), (17, 6, 1, 24), (3, 8, 8, 32)])  # 6 heads: a part block
def test_apply_rotary_emb(T, H, Hkv, D, dtype):
    xq, xk, cos, sin, angles = rotary_inputs(2, T, H, Hkv, D, dtype)
    q, k = apply_rotary_emb(xq, xk, cos, sin, out_q=poisoned(xq.shape, dtype), out_k=poisoned(xk.shape, dtype))
    assert_close(q, rotate_complex(xq, angles), dtype)
    assert_close(k, rotate_complex(xk, angles), dtype)


# ---------------------------------------------------------------------------------------------
# Attention: decode (one token per row) and prefill (many), over a strided view of a larger cache
# ---------------------------------------------------------------------------------------------


def cache_views(B, Hkv, L, D, dtype, visible_end: torch.Tensor):
    """keys, values: [B, Hkv, L, D] views into rows 1..B of a longer cache (strided in batch and
    position). Row b's positions >= visible_end[b] hold NaN, so a kernel that reads them fails; the
    clean copies are what the reference sees."""
    full_k, full_v = randn(B + 1, Hkv, L + 13, D, dtype=dtype, seed=7), randn(B + 1, Hkv, L + 13, D, dtype=dtype, seed=8)
    clean_k, clean_v = full_k[1:, :, :L].clone(), full_v[1:, :, :L].clone()
    for b in range(B):
        full_k[b + 1, :, int(visible_end[b]):] = float("nan")
        full_v[b + 1, :, int(visible_end[b]):] = float("nan")
    return full_k[1:, :, :L], full_v[1:, :, :L], clean_k, clean_v


def reference_attention(xq, keys, values, input_pos, window):
    """mistral.model.attention (SDPA with a mask) computed in fp32."""
    return reference.attention(xq.float(), keys.float(), values.float(), input_pos, window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 17, 300])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("num_splits", [None, 5])  # None: the default plan; 5: the split-KV merge
def test_decode_attention(L, window, num_splits, dtype):
    B, H, Hkv, D = 3, 8, 2, 32  # 4 query heads per KV head, padded to 16 for tl.dot
    input_pos = torch.tensor([L - 1, 0, L // 2], device=DEVICE)  # per-row lengths input_pos + 1
    keys, values, clean_k, clean_v = cache_views(B, Hkv, L, D, dtype, visible_end=input_pos + 1)
    xq = randn(B, 1, H, D, dtype=dtype, seed=9)
    out = decode_attention(xq, keys, values, input_pos, window, out=poisoned(xq.shape, dtype),
                           num_splits=num_splits, block_n=16)
    assert_close(out, reference_attention(xq, clean_k, clean_v, input_pos, window), dtype)


@pytest.mark.parametrize("window", [None, 100])
def test_decode_attention_default_plan_on_a_large_gpu(monkeypatch, window):
    """The default split plan as a 132-SM GPU gets it (on the CPU there is "one SM", so one split): many
    splits over a long cache view, rows far shorter than it, chunks of at least MIN_CHUNK positions,
    so that a short row leaves most splits empty."""
    import kernels.decode_attention as module

    monkeypatch.setattr(module, "num_sms", lambda device: 132)
    B, H, Hkv, D, L = 3, 4, 2, 16, 1100
    assert module.plan_splits(B, Hkv, L, torch.device(DEVICE), None, 16) == (5, module.MIN_CHUNK)
    input_pos = torch.tensor([L - 1, 300, 5], device=DEVICE)  # 5, 2 and 1 busy splits
    keys, values, clean_k, clean_v = cache_views(B, Hkv, L, D, torch.float32, visible_end=input_pos + 1)
    xq = randn(B, 1, H, D, seed=9)
    out = decode_attention(xq, keys, values, input_pos, window, out=poisoned(xq.shape, torch.float32), block_n=16)
    assert_close(out, reference_attention(xq, clean_k, clean_v, input_pos, window), torch.float32)


@pytest.mark.parametrize("H, Hkv, D", [(4, 4, 16), (6, 2, 24), (16, 1, 16)])  # GQA groups 1, 3 (odd head_dim), 16
def test_decode_attention_head_groups(H, Hkv, D):
    B, L = 2, 40
    input_pos = torch.tensor([39, 20], device=DEVICE)
    keys, values, clean_k, clean_v = cache_views(B, Hkv, L, D, torch.float32, visible_end=input_pos + 1)
    xq = randn(B, 1, H, D, seed=9)
    out = decode_attention(xq, keys, values, input_pos, None, out=poisoned(xq.shape, torch.float32), num_splits=3,
                           block_n=16)
    assert_close(out, reference_attention(xq, clean_k, clean_v, input_pos, None), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T, starts", [(2, [0, 3]), (17, [0, 30]), (300, [0, 5])])
@pytest.mark.parametrize("window", [None, 7])
def test_prefill_attention(T, starts, window, dtype):
    """Row 0 is a fresh prompt; row 1 continues a prompt already in the cache (chunked prefill)."""
    B, H, Hkv, D = 2, 4, 2, 16
    input_pos = torch.tensor(starts, device=DEVICE)
    L = max(starts) + T
    keys, values, clean_k, clean_v = cache_views(B, Hkv, L, D, dtype, visible_end=input_pos + T)
    xq = randn(B, T, H, D, dtype=dtype, seed=9)
    out = prefill_attention(xq, keys, values, input_pos, window, out=poisoned(xq.shape, dtype))
    assert_close(out, reference_attention(xq, clean_k, clean_v, input_pos, window), dtype)


def test_prefill_attention_head_groups_and_odd_head_dim():
    B, T, H, Hkv, D = 1, 20, 6, 2, 24
    input_pos = torch.tensor([4], device=DEVICE)
    keys, values, clean_k, clean_v = cache_views(B, Hkv, 24, D, torch.float32, visible_end=input_pos + T)
    xq = randn(B, T, H, D, seed=9)
    out = prefill_attention(xq, keys, values, input_pos, None, out=poisoned(xq.shape, torch.float32), block_m=16,
                            block_n=16)
    assert_close(out, reference_attention(xq, clean_k, clean_v, input_pos, None), torch.float32)


def test_ops_table_dispatches_attention_by_length():
    """The Triton table's attention: decode for one new token, prefill for more; both match the reference."""
    ops = triton_ops()
    assert ops.name == "triton" and ops.rms_norm is rms_norm and ops.silu_mul is silu_mul
    keys, values = randn(2, 2, 30, 16, seed=1), randn(2, 2, 30, 16, seed=2)
    for T, input_pos in ((1, [29, 4]), (6, [24, 0])):
        xq = randn(2, T, 4, 16, seed=3)
        pos = torch.tensor(input_pos, device=DEVICE)
        assert_close(ops.attention(xq, keys, values, pos, None), reference_attention(xq, keys, values, pos, None),
                     torch.float32)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, never a crash inside a kernel
# ---------------------------------------------------------------------------------------------


def test_wrappers_reject_bad_input():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, randn(7), 1e-5)
    with pytest.raises(ValueError, match="residual has shape"):
        add_rms_norm(x, randn(2, 9), randn(8), 1e-5)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm(x, randn(8), 1e-5, out=torch.empty(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="up .* must match gate"):
        silu_mul(x, randn(2, 9))
    with pytest.raises(ValueError, match="x must be float32"):
        rms_norm(torch.ones(2, 8, dtype=torch.long, device=DEVICE), randn(8), 1e-5)
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rotary_emb(randn(1, 2, 4, 16), randn(1, 2, 2, 16), randn(1, 2, 7), randn(1, 2, 8))
    xq, keys, pos = randn(1, 1, 4, 16), randn(1, 2, 9, 16), torch.tensor([3], device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention(xq, randn(1, 3, 9, 16), randn(1, 3, 9, 16), pos)
    with pytest.raises(ValueError, match="input_pos must be int64"):
        decode_attention(xq, keys, keys, pos.int())
    with pytest.raises(ValueError, match="sliding_window"):
        prefill_attention(randn(1, 3, 4, 16), keys, keys, pos, 0)
    with pytest.raises(ValueError, match="values has shape"):
        prefill_attention(randn(1, 3, 4, 16), keys, randn(1, 2, 8, 16), pos)


@pytest.mark.skipif(not CPU, reason="the device check is about CPU tensors without the interpreter")
def test_cpu_tensors_without_interpreter_are_refused():
    code = ("import torch, kernels.rmsnorm as k\n"
            "try:\n    k.rms_norm(torch.ones(2, 8), torch.ones(8), 1e-5)\n"
            "except ValueError as e:\n    print(e)\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "TRITON_INTERPRET=1" in res.stdout, res.stdout + res.stderr


def test_import_kernels_does_not_import_triton():
    code = "import sys, kernels; assert kernels.MISTRAL_FROM_SCRATCH; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_kernels_import_nothing_of_mistral():
    """Every kernel module, and the compile check, import without the `mistral` package."""
    modules = ["kernels." + p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__"]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "assert not [m for m in sys.modules if m.split('.')[0] == 'mistral'], 'mistral was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300, cwd=ROOT,
                   env={**os.environ, "TRITON_INTERPRET": "1"})


def test_kernels_compile_for_h100():
    """The interpreter never runs triton's GPU compiler: compile every kernel for sm_90 (H100) at
    Mistral-7B shapes, through ptxas, on this machine (see kernels/compile_check.py)."""
    pytest.importorskip("triton.backends.nvidia")
    res = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90", "--dtypes", "bfloat16"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "_decode_kernel" in res.stdout and "_prefill_kernel" in res.stdout and "_merge_kernel" in res.stdout


# ---------------------------------------------------------------------------------------------
# The whole model on the Triton kernels, against the PyTorch ops and against transformers
# ---------------------------------------------------------------------------------------------

MODEL_TOL = 1e-5  # max |Δ| / max |logit|, fp32
BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
            norm_eps=1e-5, vocab_size=512, rope_theta=1e6)
MODELS = {
    "v0.3": ModelArgs(**BASE),
    # v0.1's sliding window, and a head_dim that is not a power of two (n_heads * head_dim != dim)
    "window-7-head-dim-24": ModelArgs(**{**BASE, "head_dim": 24, "sliding_window": 7}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("config", list(MODELS))
@torch.inference_mode()
def test_model_on_triton_kernels(config, tmp_path):
    """Prefill of two rows at different positions, then decode steps, with kernels="triton", against
    the same model on kernels="torch" and against transformers' MistralForCausalLM."""
    from transformers import MistralForCausalLM

    args = MODELS[config]
    folder = make_random(tmp_path / "consolidated", args, "consolidated", "float32", seed=7, tokenizer=False)
    hf = make_random(tmp_path / "hf", args, "hf", "float32", seed=7, tokenizer=False)  # the same weights
    oracle = MistralForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    triton_model = load_model(folder, device=DEVICE, kernels="triton", max_seq_len=64, quiet=True)
    torch_model = load_model(folder, device=DEVICE, kernels="torch", max_seq_len=64, quiet=True)
    assert triton_model.ops is triton_ops() and triton_model.layers[0].attention.ops is triton_ops()

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab_size, (2, 17), generator=g).to(DEVICE)  # 17 > the window of 7
    assert rel_err(triton_model(tokens), torch_model(tokens)) <= MODEL_TOL
    assert rel_err(triton_model(tokens), oracle(tokens.cpu()).logits.to(DEVICE)) <= MODEL_TOL

    # Row 0 prefills 9 tokens, row 1 13 (its last 4 padding), then they decode at different positions.
    caches = {m: m.new_cache(max_batch=2, max_seq_len=32) for m in (triton_model, torch_model)}
    prefill = {m: m(tokens[:, :13], torch.tensor([0, 0], device=DEVICE), c) for m, c in caches.items()}
    assert rel_err(prefill[triton_model], prefill[torch_model]) <= MODEL_TOL
    positions = torch.tensor([13, 9], device=DEVICE)
    for step in range(3):
        nxt = tokens[:, 13 + step : 14 + step]
        logits = {m: m(nxt, positions, c, last_only=True) for m, c in caches.items()}
        assert rel_err(logits[triton_model], logits[torch_model]) <= MODEL_TOL
        positions = positions + 1
    row0 = torch.cat([tokens[0, :13], tokens[0, 13:16]])
    assert rel_err(logits[triton_model][0, -1], oracle(row0[None].cpu()).logits[0, -1].to(DEVICE)) <= MODEL_TOL
    row1 = torch.cat([tokens[1, :9], tokens[1, 13:16]])
    assert rel_err(logits[triton_model][1, -1], oracle(row1[None].cpu()).logits[0, -1].to(DEVICE)) <= MODEL_TOL


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU: Mistral-7B sizes in bf16, and proof that the Triton kernels ran
# ---------------------------------------------------------------------------------------------

H7, HKV7, D7, DIM7, HIDDEN7 = 32, 8, 128, 4096, 14336


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_norms_rope_swiglu_at_7b_sizes():
    bf = torch.bfloat16
    x, residual, weight = randn(4, 37, DIM7, dtype=bf, seed=1), randn(4, 37, DIM7, dtype=bf, seed=2), randn(DIM7, dtype=bf)
    assert_close(rms_norm(x, weight, 1e-5, out=poisoned(x.shape, bf)), reference.rms_norm(x, weight, 1e-5), bf)
    normed, h = add_rms_norm(x, residual, weight, 1e-5, out=poisoned(x.shape, bf), h_out=poisoned(x.shape, bf))
    expected_normed, expected_h = reference.add_rms_norm(x, residual, weight, 1e-5)
    assert_close(h, expected_h, bf)
    assert_close(normed, expected_normed, bf)
    gate, up = randn(37, HIDDEN7, dtype=bf, scale=4.0, seed=3), randn(37, HIDDEN7, dtype=bf, seed=4)
    assert_close(silu_mul(gate, up, out=poisoned(gate.shape, bf)), reference.silu_mul(gate, up), bf)
    xq, xk, cos, sin, angles = rotary_inputs(2, 300, H7, HKV7, D7, bf)
    q, k = apply_rotary_emb(xq, xk, cos, sin, out_q=poisoned(xq.shape, bf), out_k=poisoned(xk.shape, bf))
    assert_close(q, rotate_complex(xq, angles), bf)
    assert_close(k, rotate_complex(xk, angles), bf)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4096])
@torch.inference_mode()
def test_gpu_attention_at_7b_sizes(window):
    bf = torch.bfloat16
    L = 8192
    input_pos = torch.tensor([L - 1, 0, 5000, 4095], device=DEVICE)
    keys, values, clean_k, clean_v = cache_views(4, HKV7, L, D7, bf, visible_end=input_pos + 1)
    xq = randn(4, 1, H7, D7, dtype=bf, seed=9)
    out = decode_attention(xq, keys, values, input_pos, window, out=poisoned(xq.shape, bf))
    assert_close(out, reference_attention(xq, clean_k, clean_v, input_pos, window), bf)

    T, starts = 1000, torch.tensor([0, 3000], device=DEVICE)
    keys, values, clean_k, clean_v = cache_views(2, HKV7, 4000, D7, bf, visible_end=starts + T)
    xq = randn(2, T, H7, D7, dtype=bf, seed=10)
    out = prefill_attention(xq, keys, values, starts, window, out=poisoned(xq.shape, bf))
    assert_close(out, reference_attention(xq, clean_k, clean_v, starts, window), bf)


@pytest.mark.gpu
@torch.inference_mode()
def test_gpu_model_runs_the_triton_kernels(tmp_path):
    """bf16 on CUDA: kernels="triton" is close to kernels="torch", and the profiler shows our kernels ran."""
    from torch.profiler import ProfilerActivity, profile

    args = ModelArgs(dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=128, hidden_dim=2048,
                     norm_eps=1e-5, vocab_size=32768, rope_theta=1e6)
    folder = make_random(tmp_path, args, "consolidated", "bfloat16", seed=3, tokenizer=False)
    triton_model = load_model(folder, device="cuda", kernels="triton", max_seq_len=1024, quiet=True)
    torch_model = load_model(folder, device="cuda", kernels="torch", max_seq_len=1024, quiet=True)
    assert load_model(folder, device="cuda", kernels="auto", max_seq_len=64, quiet=True).ops is triton_ops()
    tokens = torch.randint(0, args.vocab_size, (2, 200), device="cuda")
    caches = {m: m.new_cache(2, 256) for m in (triton_model, torch_model)}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = triton_model(tokens, torch.zeros(2, dtype=torch.long, device="cuda"), caches[triton_model])
        step = triton_model(tokens[:, :1], torch.tensor([200, 200], device="cuda"), caches[triton_model])
        torch.cuda.synchronize()
    ran = {event.name for event in prof.events()}
    for name in ("_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel", "_prefill_kernel", "_decode_kernel"):
        assert any(name in r for r in ran), f"{name} did not run; kernels seen: {sorted(ran)[:20]}"
    expected = torch_model(tokens, torch.zeros(2, dtype=torch.long, device="cuda"), caches[torch_model])
    expected_step = torch_model(tokens[:, :1], torch.tensor([200, 200], device="cuda"), caches[torch_model])
    assert rel_err(out, expected) <= 3e-2 and rel_err(step, expected_step) <= 3e-2
    assert math.isfinite(out.float().abs().max().item())
