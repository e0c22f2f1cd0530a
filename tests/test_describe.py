"""`mistral describe`: parameter counts against real checkpoints and transformers, KV bytes against the
cache the model allocates, FLOPs against torch's FLOP counter on a real forward pass."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors import safe_open
from torch.utils.flop_counter import FlopCounterMode
from transformers import MistralConfig, MistralForCausalLM

from mistral.args import PRESETS, ModelArgs, preset
from mistral.cli import main
from mistral.describe import (
    GPUS, count_parameters, decode_cost, describe, gpu, kv_bytes_per_token, prefill_cost, resolve, tensor_groups,
)
from mistral.errors import MistralError
from mistral.inspection import explicit_attention
from mistral.loader import tensor_shapes
from mistral.make_random import make_random
from mistral.model import TORCH_OPS, Transformer

SEVEN_B = 7_248_023_552  # Mistral-7B-v0.3, the sum over its consolidated.safetensors

ODD = ModelArgs(dim=96, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=24, hidden_dim=160,
                norm_eps=1e-5, vocab_size=300, rope_theta=1e6, sliding_window=5)  # n_heads * head_dim != dim


def safetensors_numel(folder) -> int:
    """What the files hold, read by the safetensors library itself."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def test_7b_total_is_the_published_figure():
    args = preset("7b-v0.3")
    assert count_parameters(args) == SEVEN_B
    assert sum(math.prod(s) for s in tensor_shapes(args).values()) == SEVEN_B
    assert describe(args).to_dict()["total_params"] == SEVEN_B


@pytest.mark.parametrize("args", [*PRESETS.values(), ODD], ids=[*PRESETS, "odd"])
def test_groups_are_exactly_the_checkpoint_tensors(args):
    expected: dict[tuple[str, tuple], int] = {}  # (name with layers.*., shape) -> how many tensors
    for name, shape in tensor_shapes(args).items():
        parts = name.split(".")
        key = ("layers.*." + ".".join(parts[2:]) if parts[0] == "layers" else name, tuple(shape))
        expected[key] = expected.get(key, 0) + 1
    assert {(g.name, g.shape): g.count for g in tensor_groups(args)} == expected


@pytest.mark.parametrize("args", [*PRESETS.values(), ODD], ids=[*PRESETS, "odd"])
def test_total_matches_transformers(args):
    with torch.device("meta"):  # no memory, even for 7B
        oracle = MistralForCausalLM(MistralConfig(**args.to_hf_config()))
    assert count_parameters(args) == sum(p.numel() for p in oracle.parameters())


@pytest.mark.parametrize("fmt", ["consolidated", "hf"])
def test_describe_of_a_random_checkpoint_equals_its_files(tmp_path, fmt):
    folder = make_random(tmp_path, ODD, fmt, "bfloat16", tokenizer=False, shard_bytes=64 * 2**10)
    if fmt == "hf":
        assert len(list(folder.glob("*.safetensors"))) > 1  # several shards, all counted
    args, _, checkpoint = resolve(str(folder))
    held = safetensors_numel(folder)
    assert count_parameters(args) == held
    assert checkpoint["params"] == held and checkpoint["bytes_by_dtype"] == {"BF16": 2 * held}
    assert checkpoint["n_tensors"] == len(tensor_shapes(ODD))


def test_config_files_and_a_folder_without_tensors(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(ODD.to_params()))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(ODD.to_hf_config()))
    for source in (tmp_path / "params.json", tmp_path / "hf" / "config.json", tmp_path, tmp_path / "hf"):
        args, _, checkpoint = resolve(str(source))
        assert args == ODD and checkpoint is None


def test_kv_bytes_equal_the_cache_the_model_allocates():
    for args in (preset("small"), ODD):
        cache = Transformer(args, max_seq_len=8).new_cache(max_batch=3, max_seq_len=8)
        allocated = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        assert kv_bytes_per_token(args, bytes_per_value=4) == allocated / (3 * 8)
    kv = describe(preset("7b-v0.3")).to_dict()["kv_cache"]
    assert kv["bytes_per_token"] == 128 * 2**10  # 2 × 32 layers × 8 heads × 128 × 2 bytes
    assert kv["bytes_at_max_context"] == 4 * 2**30
    assert kv["bytes_per_token_without_gqa"] == 4 * kv["bytes_per_token"]


def _counted_flops(model: Transformer, tokens: torch.Tensor, input_pos: int, cache, **kw) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(tokens, torch.tensor([input_pos]), cache, **kw)
    return counter.get_total_flops()


@pytest.mark.parametrize("args", [preset("small"), ODD], ids=["small", "odd"])
def test_flops_match_torch_flop_counter(args):
    # The explicit attention is made of matmuls, which the counter sees (fused SDPA it does not).
    model = Transformer(args, max_seq_len=32).use_ops(
        dataclasses.replace(TORCH_OPS, attention=lambda *a: explicit_attention(*a, record=lambda p: None))
    )
    cache = model.new_cache(1, 32)
    T = 12
    prompt = torch.randint(0, args.vocab_size, (1, T))
    # Prefill: the counter sees the full T×T score matrix; describe counts only its causal half
    # (what a kernel that skips masked tiles does), within the window where there is one.
    counted = _counted_flops(model, prompt, 0, cache.view(length=T), last_only=True)
    H, D, n = args.n_heads, args.head_dim, args.n_layers
    visible = sum(min(p + 1, args.sliding_window or T) for p in range(T))
    assert prefill_cost(args, T).flops == counted - 4 * n * H * D * (T * T - visible)
    # Decode token number T + 1 against T cached positions: nothing is masked without a window.
    counted = _counted_flops(model, prompt[:, :1], T, cache.view(length=T + 1))
    span = min(T + 1, args.sliding_window or T + 1)
    assert decode_cost(args, T + 1).flops == counted - 4 * n * H * D * (T + 1 - span)


def test_roofline_by_hand_for_7b_on_h100():
    args, h100 = preset("7b-v0.3"), GPUS["h100"]
    assert (h100.bandwidth, h100.flops) == (3.35e12, 989.4e12)
    # Token number 1: every weight but the embedding table, one embedding row, and the new K/V.
    d = decode_cost(args, 1)
    weights = (SEVEN_B - 32768 * 4096 + 4096) * 2
    assert d.bytes == weights + 2 * 131072
    assert d.flops == 2 * (SEVEN_B - 32768 * 4096 - 65 * 4096) + 4 * 32 * 32 * 128
    assert d.bound(h100) == "memory"
    assert d.floor_s(h100) == pytest.approx((weights + 2 * 131072) / 3.35e12)
    assert 4.2e-3 < d.floor_s(h100) < 4.3e-3
    # Batching reads the weights once for every row: 64 rows cost far less than 64 × one row.
    assert decode_cost(args, 1, batch=64).floor_s(h100) < 2 * d.floor_s(h100)
    assert prefill_cost(args, 4096).bound(h100) == "compute"


def test_gpu_choices_and_errors():
    assert gpu() is GPUS["h100"] and gpu("A100") is GPUS["a100"]
    custom = gpu(bandwidth_gbs=1000, tflops=100)
    assert (custom.bandwidth, custom.flops, custom.source) == (1e12, 1e14, "given")
    assert gpu("l4", tflops=60).bandwidth == GPUS["l4"].bandwidth
    for bad in (dict(name="tpu"), dict(bandwidth_gbs=1000), dict(bandwidth_gbs=-1, tflops=1),
                dict(name="h100", tflops=float("nan"))):
        with pytest.raises(MistralError):
            gpu(**bad)
    with pytest.raises(MistralError, match="not a preset"):
        resolve("no-such-thing")
    with pytest.raises(MistralError, match="batch"):
        describe(ODD, batch=0)


def test_cli_text_and_json(capsys, tmp_path):
    assert main(["describe", "7b-v0.3"]) == 0
    text = capsys.readouterr().out
    assert "7,248,023,552" in text and "spec-sheet" in text and "GQA saves 4×" in text
    assert main(["describe", "7b-v0.3", "--json", "--gpu", "h200", "--batch", "8", "--seq-lens", "1,100"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total_params"] == SEVEN_B and [r["seq_len"] for r in data["roofline"]["rows"]] == [1, 100]
    assert main(["describe", "7b-v0.3", "--seq-lens", "1,x"]) == 2
    assert main(["describe", str(tmp_path / "missing")]) == 2
    (tmp_path / "params.json").write_text("{not json")
    assert main(["describe", str(tmp_path / "params.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
