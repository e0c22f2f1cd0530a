"""Weight-only quantization (mistral/quantize.py): the layers against a dequantize-then-F.linear
reference, the whole model against fp32, checkpoints written and read back, bad files refused."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mistral.args import ModelArgs
from mistral.cli import main
from mistral.errors import CheckpointError
from mistral.loader import load_model
from mistral.make_random import make_random
from mistral.model import Linear
from mistral.quantize import (Int4Linear, Int8Linear, Quantization, dequantize, pack_for_cpu, quantize_int4,
                              quantize_tensor, unpack_int4, write_quantized)

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=256, norm_eps=1e-5,
                 vocab_size=512, rope_theta=1e6)
METHODS = [Quantization("int8"), Quantization("int4", 32), Quantization("int4", 128)]
IDS = ["int8", "int4-32", "int4-128"]


def quantized_linear(q: Quantization, in_features: int, out_features: int, dtype=torch.float32, seed=0):
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    m = q.module(in_features, out_features)
    m.weight, m.scales = quantize_tensor(w, q, dtype)
    return m, w


def test_int4_packing_is_two_nibbles_a_byte_low_first():
    w = torch.tensor([[-7.0, 8.0, 0.0, 2.5] * 8])  # one group of 32; 8, the largest, becomes -8: scale -1
    packed, scales = quantize_int4(w, 32, torch.float32)
    assert scales.tolist() == [[-1.0]]
    assert packed[0, :2].tolist() == [(7 + 8) | (-8 + 8) << 4, (0 + 8) | (-2 + 8) << 4]  # -2.5 rounds to even -2
    assert unpack_int4(packed)[0, :4].tolist() == [7, -8, 0, -2]


@pytest.mark.parametrize("q", METHODS, ids=IDS)
def test_quantization_error_is_within_half_a_step(q):
    m, w = quantized_linear(q, 256, 64)
    err = (dequantize(m) - w).abs()
    scales = m.scales if q.method == "int8" else m.scales.repeat_interleave(q.group_size, dim=1)
    step = (scales[:, None] if q.method == "int8" else scales).abs().expand_as(w)
    # Rounding: half a step; int4 puts the group's extreme at -8, so the other end (up to +8 steps)
    # may clamp to +7: one step at most, there.
    clamped = (w / step).abs() > 7.5 if q.method == "int4" else torch.zeros_like(w, dtype=torch.bool)
    assert (err[~clamped] <= step[~clamped] / 2 + 1e-6).all() and (err[clamped] <= step[clamped] + 1e-6).all()


@pytest.mark.parametrize("q", METHODS, ids=IDS)
@pytest.mark.parametrize("rows", [1, 3, 7, 20])  # 20: past the packed int8 mat-mul, a prefill
def test_eager_layer_equals_dequantize_then_linear(q, rows):
    m, _ = quantized_linear(q, 256, 48)
    x = torch.randn(1, rows, 256)
    ref = F.linear(x.double(), dequantize(m, torch.float64))
    out = m(x)
    assert out.shape == (1, rows, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("q", METHODS, ids=IDS)
def test_bfloat16_layer_equals_dequantize_then_linear_to_bf16_rounding(q):
    m, _ = quantized_linear(q, 256, 48, dtype=torch.bfloat16)
    x = torch.randn(1, 2, 256).to(torch.bfloat16)
    ref = F.linear(x.double(), dequantize(m, torch.float64))
    torch.testing.assert_close(m(x).double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


@pytest.mark.parametrize("q", METHODS, ids=IDS)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bfloat16_decode_runs_pytorchs_packed_cpu_kernel(q, compiled):
    """bf16 activations on the CPU: a few rows go through PyTorch's packed int8 / int4 mat-mul (the
    int4 layout made by pack_for_cpu), eager and compiled, and equal the dequantized reference."""
    from torch._inductor.utils import run_and_get_code

    m, _ = quantized_linear(q, 256, 48, dtype=torch.bfloat16)
    pack_for_cpu(m)
    x = torch.randn(1, 1, 256).to(torch.bfloat16)
    ref = F.linear(x.double(), dequantize(m, torch.float64))
    op = "_weight_int8pack_mm" if q.method == "int8" else "_weight_int4pack_mm_for_cpu"
    if compiled:
        out, code = run_and_get_code(torch.compile(m, fullgraph=True), x)
        assert op in "".join(code)
    else:
        with torch.profiler.profile() as prof:
            out = m(x)
        assert any(op in e.name for e in prof.events())
    torch.testing.assert_close(out.double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


@pytest.mark.parametrize("q", METHODS[:2], ids=IDS[:2])
def test_compiled_layer_equals_dequantize_then_linear(q):
    m, _ = quantized_linear(q, 256, 48)
    x = torch.randn(1, 1, 256)
    ref = F.linear(x.double(), dequantize(m, torch.float64))
    out = torch.compile(m, fullgraph=True)(x)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("q", METHODS[:2], ids=IDS[:2])
def test_compiled_layer_stores_no_dequantized_matrix(q):
    """The point of the compiled form: each weight is converted inside the reduction that reads it.
    With the engine's options (realize_opcount_threshold=0: every intermediate stored), no buffer
    as large as a quarter of W may be allocated."""
    import re
    from math import prod

    from torch._inductor.utils import run_and_get_code

    m, _ = quantized_linear(q, 256, 64)
    compiled = torch.compile(m, fullgraph=True, options={"realize_opcount_threshold": 0})
    _, code = run_and_get_code(compiled, torch.randn(1, 1, 256))
    shapes = [tuple(int(d) for d in re.findall(r"\d+", dims)) for dims in re.findall(r"empty_strided_cpu\(\(([\d, ]*)\)", code[0])]
    assert shapes and max(prod(s) for s in shapes) < 256 * 64 // 4, shapes


def test_module_swap_covers_every_linear_layer_and_not_the_embedding(tmp_path):
    folder = make_random(tmp_path / "m", ARGS, "consolidated", "float32", seed=1, tokenizer=False)
    model = load_model(folder, quantize="int4")
    swapped = [name for name, mod in model.named_modules() if isinstance(mod, Int4Linear)]
    assert len(swapped) == 7 * ARGS.n_layers + 1 and "output" in swapped
    assert not any(isinstance(mod, Linear) for mod in model.modules())
    assert model.tok_embeddings.weight.dtype == torch.float32
    assert all(not p.is_floating_point() for n, p in model.state_dict().items() if n.endswith("w1.weight"))


# --- the whole model against fp32 ---------------------------------------------------------------

# Over 256 positions of a random 2-layer model (make_random's N(0, 0.02) weights; BENCHMARKS.md
# has the same figures at 0.5B): max |Δlogit| / max |logit|, top-1 agreement, mean KL(fp32 ‖ quantized).
# Measured: int8 0.012 / 98% / 4e-6; int4-32 0.19 / 75% / 6e-4; int4-128 0.21 / 69% / 8e-4. Random
# models' logits are nearly tied, so top-1 flips far more easily than in a trained model.
BOUNDS = {"int8": (0.03, 0.95, 2e-5), "int4": (0.3, 0.6, 3e-3), "int4-128": (0.35, 0.6, 4e-3)}


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    folder = make_random(tmp_path_factory.mktemp("fp32"), ARGS, "consolidated", "float32", seed=3, tokenizer=False)
    return folder, load_model(folder)


def model_error(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float, float]:
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean().item()
    return rel, top1, kl


@pytest.mark.parametrize("spec", list(BOUNDS))
def test_quantized_model_against_fp32(fp32_model, spec):
    folder, ref_model = fp32_model
    tokens = torch.randint(0, ARGS.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, out = ref_model(tokens)[0], load_model(folder, quantize=spec)(tokens)[0]
    rel, top1, kl = model_error(ref, out)
    max_rel, min_top1, max_kl = BOUNDS[spec]
    assert rel < max_rel and top1 >= min_top1 and kl < max_kl, (rel, top1, kl)


@pytest.mark.parametrize("spec", list(BOUNDS))
def test_quantized_model_against_fp32_on_the_decode_path(fp32_model, spec):
    """The same bounds one position at a time, where the linear layers see one row: on the CPU the
    hand-written kernels, which also round the activations to int8 (tests/test_cpu_kernels.py)."""
    folder, ref_model = fp32_model
    tokens = torch.randint(0, ARGS.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    model = load_model(folder, quantize=spec, kernels="auto")
    assert all(m.cpu_matvec for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear)))
    cache = model.new_cache(1, 256)
    with torch.inference_mode():
        ref = ref_model(tokens)[0]
        out = torch.cat([model(tokens[:, i:i + 1], torch.tensor([i]), cache)[0] for i in range(256)])
    rel, top1, kl = model_error(ref, out)
    max_rel, min_top1, max_kl = BOUNDS[spec]
    assert rel < max_rel and top1 >= min_top1 and kl < max_kl, (rel, top1, kl)


@pytest.mark.parametrize("spec", ["int8", "int4", "int4-128"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merged_quantized_projections_give_each_projection_its_own_bits(fp32_model, spec, dtype):
    """With the CPU kernels, each layer's wq|wk|wv and w1|w3 are one call (merged.py); every output
    row is computed alike whatever the matrix's height, so a decode step's logits equal those of the
    separate calls bit for bit, batch rows and a prompt included; the checkpoint names and shapes
    stay as they were."""
    from mistral.merged import unmerged

    folder, _ = fp32_model
    model = load_model(folder, quantize=spec, dtype=dtype, kernels="auto")
    plain = load_model(folder, quantize=spec, dtype=dtype, kernels="torch")
    attention = model.layers[0].attention
    assert "project_qkv" in attention.__dict__ and "project_gate_up" in model.layers[0].feed_forward.__dict__
    assert attention.wq.weight.untyped_storage().data_ptr() == attention.wv.weight.untyped_storage().data_ptr()
    assert {k: (v.shape, v.dtype) for k, v in model.state_dict().items()} == \
           {k: (v.shape, v.dtype) for k, v in plain.state_dict().items()}
    tokens = torch.randint(0, ARGS.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        runs = []
        for merged in (True, False):
            with contextlib.nullcontext() if merged else unmerged(model):
                cache = model.new_cache(3, 16)
                prompt = model(tokens[:, :8], torch.tensor([0]), cache)  # 24 rows: dequantized GEMMs
                step = model(tokens[:, 8:], torch.tensor([8]), cache)  # 3 rows through the kernels
                runs.append((prompt, step))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["int8", "int4", "int4-128"])
def test_round_trip_quantize_save_load_gives_the_same_logits(fp32_model, tmp_path, spec):
    folder, _ = fp32_model
    out = write_quantized(folder, tmp_path / spec, spec)
    assert json.loads((out / "quantization.json").read_text()) == Quantization.parse(spec).to_json()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        on_the_fly = load_model(folder, quantize=spec)(tokens)
        from_file = load_model(out)(tokens)
        asked_again = load_model(out, quantize=spec)(tokens)  # the same quantization named: allowed
    assert torch.equal(on_the_fly, from_file) and torch.equal(from_file, asked_again)
    assert (out / "consolidated.safetensors").stat().st_size < 0.6 * (folder / "consolidated.safetensors").stat().st_size


def test_hf_source_and_bf16_scales(tmp_path):
    hf = make_random(tmp_path / "hf", ARGS, "hf", "bfloat16", seed=3, tokenizer=False)
    consolidated = make_random(tmp_path / "c", ARGS, "consolidated", "bfloat16", seed=3, tokenizer=False)
    a, b = write_quantized(hf, tmp_path / "a", "int4"), write_quantized(consolidated, tmp_path / "b", "int4")
    ta, tb = load_file(a / "consolidated.safetensors"), load_file(b / "consolidated.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)  # the HF rows unpermuted first
    assert ta["layers.0.feed_forward.w2.scales"].dtype == torch.bfloat16
    # loaded on the CPU in bf16 without the hand-written kernels (tests/test_cpu_kernels.py has
    # them), every int4 layer has PyTorch's packed layout, and computes as the checkpoint's nibbles say
    model = load_model(a, max_seq_len=16, kernels="torch")
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert layers and all(m.cpu_packed is not None and not m.cpu_matvec for m in layers)
    x = torch.randn(1, 1, ARGS.dim).to(torch.bfloat16)
    wq = layers[0]
    ref = F.linear(x.double(), dequantize(wq, torch.float64))
    torch.testing.assert_close(wq(x).double(), ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


@pytest.mark.parametrize("spec", ["int8", "int4", "int4-128"])
def test_scales_dtype_of_an_fp32_model(fp32_model, tmp_path, spec):
    """int4's scales are bf16 for an fp32 model (q4_0's 4.5 bits a weight), int8's stay fp32; the
    file keeps them so, a bf16 model has bf16 ones, and PyTorch's packed int4 copy (which computes in
    the scales' dtype) is made for none of the fp32 model's layers."""
    folder, _ = fp32_model
    want = torch.bfloat16 if spec.startswith("int4") else torch.float32
    model = load_model(folder, quantize=spec, kernels="torch")
    layers = [m for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]
    assert layers and {m.scales.dtype for m in layers} == {want}
    assert model.norm.weight.dtype == torch.float32
    assert all(getattr(m, "cpu_packed", None) is None for m in layers)
    out = write_quantized(folder, tmp_path / spec, spec)
    assert load_file(out / "consolidated.safetensors")["layers.0.attention.wq.scales"].dtype == want
    assert {m.scales.dtype for m in load_model(out).modules() if isinstance(m, (Int8Linear, Int4Linear))} == {want}
    bf16 = load_model(folder, dtype="bfloat16", quantize=spec, kernels="torch")
    assert {m.scales.dtype for m in bf16.modules() if isinstance(m, (Int8Linear, Int4Linear))} == {torch.bfloat16}


def test_a_stored_checkpoints_fp32_int4_scales_stay_fp32(fp32_model, tmp_path):
    """A file written with fp32 int4 scales (before they were bf16) loads with them as they are:
    its nibbles were rounded against those values, and rounding them again would move every weight."""
    folder, _ = fp32_model
    out = write_quantized(folder, tmp_path / "q", "int4")
    tensors = load_file(out / "consolidated.safetensors")
    scales = {k: v for k, v in tensors.items() if k.endswith(".scales")}
    fp32 = {k: v.float() + torch.where(torch.arange(v.shape[-1]) % 2 == 0, 2.0**-12, 0.0) * v.float()
            for k, v in scales.items()}  # values no bf16 holds
    save_file({**tensors, **fp32}, out / "consolidated.safetensors")
    model = load_model(out)
    wq = model.layers[0].attention.wq
    assert wq.scales.dtype == torch.float32 and torch.equal(wq.scales, fp32["layers.0.attention.wq.scales"])
    assert load_model(out, dtype="bfloat16").layers[0].attention.wq.scales.dtype == torch.bfloat16


def test_cli_quantize_then_logits(fp32_model, tmp_path):
    folder, _ = fp32_model
    assert main(["quantize", str(folder), "--to", "int8", "--out", str(tmp_path / "q")]) == 0
    assert main(["logits", str(tmp_path / "q"), "--tokens", "1,5,9", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main(["logits", str(folder), "--tokens", "1,5,9", "--quantize", "int8",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    assert torch.equal(load_file(tmp_path / "a.safetensors")["logits"], load_file(tmp_path / "b.safetensors")["logits"])


@pytest.fixture(scope="module")
def int8_folder(fp32_model, tmp_path_factory):
    return write_quantized(fp32_model[0], tmp_path_factory.mktemp("int8"), "int8")


def _copy(folder, tmp_path):
    import shutil

    return shutil.copytree(folder, tmp_path / "copy")


def _edit_tensors(folder, edit):
    path = folder / "consolidated.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize("config, message", [
    ("{not json", "quantization.json: not valid JSON"),
    ('{"bits": 8}', 'quantization.json: expected an object with a "method"'),
    ('{"method": "int3"}', "quantization.json: quantization must be one of int8, int4"),
    ('{"method": "int4", "group_size": 48}', "quantization.json: int4 group_size must be one of"),
])
def test_bad_quantization_json(int8_folder, tmp_path, config, message):
    folder = _copy(int8_folder, tmp_path)
    (folder / "quantization.json").write_text(config)
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


def test_float_weight_in_a_quantized_file_is_named(int8_folder, tmp_path):
    folder = _copy(int8_folder, tmp_path)
    _edit_tensors(folder, lambda t: t.update({"layers.1.attention.wk.weight": t["layers.1.attention.wk.weight"].float()}))
    with pytest.raises(CheckpointError, match=r"'layers.1.attention.wk.weight' has dtype torch.float32, expected torch.int8"):
        load_model(folder)


def test_missing_scales_are_named(int8_folder, tmp_path):
    folder = _copy(int8_folder, tmp_path)
    _edit_tensors(folder, lambda t: t.pop("layers.0.feed_forward.w2.scales"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers.0.feed_forward.w2.scales"):
        load_model(folder)


def test_scales_of_the_wrong_shape_are_named(int8_folder, tmp_path):
    folder = _copy(int8_folder, tmp_path)
    _edit_tensors(folder, lambda t: t.update({"output.scales": t["output.scales"][:-1].clone()}))
    with pytest.raises(CheckpointError, match=r"'output.scales' has shape \[511\]"):
        load_model(folder)


def test_a_full_precision_file_marked_quantized_is_refused(fp32_model, tmp_path):
    folder = _copy(fp32_model[0], tmp_path)
    (folder / "quantization.json").write_text('{"method": "int8"}')
    with pytest.raises(CheckpointError, match=r"'layers\.\d+\.\w+\.w\w+\.weight' has dtype torch.float32, expected torch.int8"):
        load_model(folder)


def test_requantizing_is_refused_in_one_line(int8_folder, tmp_path, capsys):
    assert main(["logits", str(int8_folder), "--tokens", "1", "--quantize", "int4", "--out", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already quantized (int8 per output channel)" in err
    assert main(["quantize", str(int8_folder), "--to", "int4", "--out", str(tmp_path / "q")]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_int4_groups_must_divide_the_input_dimension():
    with pytest.raises(ValueError, match="groups of 128 do not divide the input dimension 96"):
        Int4Linear(96, 8, 128)
    with pytest.raises(ValueError, match="unknown quantization 'int4-x'"):
        Quantization.parse("int4-x")
    assert isinstance(Quantization("int8").module(4, 4), Int8Linear)
