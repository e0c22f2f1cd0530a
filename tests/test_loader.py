"""Checkpoint folders: format detection, and a clear error for every kind of bad input."""

import hashlib
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral.args import ModelArgs, preset
from mistral.cli import main
from mistral.errors import CheckpointError
from mistral.loader import find_checkpoint, load_model
from mistral.make_random import make_random

ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=48,
                 norm_eps=1e-5, vocab_size=128, rope_theta=1e6)


@pytest.fixture
def consolidated(tmp_path):
    return make_random(tmp_path / "c", ARGS, "consolidated", "float32", seed=3, tokenizer=False)


@pytest.fixture
def hf(tmp_path):
    return make_random(tmp_path / "h", ARGS, "hf", "float32", seed=3, tokenizer=False)


def test_detects_each_format_and_prefers_consolidated(tmp_path, consolidated, hf, caplog):
    assert find_checkpoint(consolidated).format == "consolidated"
    assert find_checkpoint(hf).format == "hf"
    both = tmp_path / "both"
    make_random(both, ARGS, "consolidated", "float32", seed=3, tokenizer=False)
    make_random(both, ARGS, "hf", "float32", seed=3, tokenizer=False)
    with caplog.at_level(logging.INFO, logger="mistral"):
        assert find_checkpoint(both).format == "consolidated"
    assert "both formats" in caplog.text
    assert find_checkpoint(both, prefer="hf").format == "hf"


def test_sharded_hf_checkpoint(tmp_path, consolidated):
    sharded = make_random(tmp_path / "sharded", ARGS, "hf", "float32", seed=3, shard_bytes=20_000, tokenizer=False)
    ckpt = find_checkpoint(sharded)
    assert len(ckpt.tensor_files) > 2
    tokens = torch.tensor([[1, 5, 9, 77]])
    with torch.inference_mode():
        assert torch.equal(load_model(sharded, quiet=True)(tokens), load_model(consolidated, quiet=True)(tokens))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_model(tmp_path / "nope")


def test_file_instead_of_folder(consolidated):
    with pytest.raises(CheckpointError, match="not a folder"):
        load_model(consolidated / "params.json")


def test_no_recognised_checkpoint(tmp_path):
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointError, match="no recognised checkpoint"):
        load_model(tmp_path)


def test_pickles_are_refused(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(ARGS.to_params()))
    (tmp_path / "consolidated.00.pth").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(CheckpointError, match="only safetensors is supported"):
        load_model(tmp_path)


def _rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_missing_tensor_is_named(consolidated):
    _rewrite(consolidated / "consolidated.safetensors", lambda t: t.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) layers\.1\.feed_forward\.w3\.weight in consolidated\.safetensors"):
        load_model(consolidated)


def test_missing_tensor_named_in_hf_terms(hf):
    _rewrite(hf / "model.safetensors", lambda t: t.pop("model.layers.0.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        load_model(hf)


def test_unexpected_tensor_is_named(consolidated):
    _rewrite(consolidated / "consolidated.safetensors", lambda t: t.update({"layers.9.attention.wq.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: unexpected tensor 'layers\.9\.attention\.wq\.weight'"):
        load_model(consolidated)


def test_shape_mismatch_against_params(consolidated):
    params = json.loads((consolidated / "params.json").read_text())
    params["hidden_dim"] = 64
    (consolidated / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"'layers\.0\.feed_forward\.w1\.weight' has shape \[48, 32\], but params\.json implies \[64, 32\]"):
        load_model(consolidated)


def test_truncated_file(consolidated):
    path = consolidated / "consolidated.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors.*truncated or corrupt"):
        load_model(consolidated)


def test_corrupt_header(consolidated):
    path = consolidated / "consolidated.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header is now garbage
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors.*truncated or corrupt"):
        load_model(consolidated)


def test_empty_file(consolidated):
    (consolidated / "consolidated.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors"):
        load_model(consolidated)


@pytest.mark.parametrize("field", ["dim", "n_layers", "n_kv_heads", "norm_eps", "vocab_size"])
def test_params_missing_field(consolidated, field):
    params = json.loads((consolidated / "params.json").read_text())
    del params[field]
    (consolidated / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=rf"params\.json: missing field '{field}'"):
        load_model(consolidated)


@pytest.mark.parametrize("field", ["hidden_size", "num_key_value_heads", "rms_norm_eps", "rope_theta"])
def test_config_missing_field(hf, field):
    config = json.loads((hf / "config.json").read_text())
    del config[field]
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"config\.json: missing field '{field}'"):
        load_model(hf)


def test_config_rope_theta_in_rope_parameters(hf):
    """transformers >= 5 writes rope_theta under rope_parameters."""
    config = json.loads((hf / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    (hf / "config.json").write_text(json.dumps(config))
    assert find_checkpoint(hf).args().rope_theta == 1e6


def test_params_wrong_type_and_bad_json(consolidated):
    params = json.loads((consolidated / "params.json").read_text())
    params["n_heads"] = "four"
    (consolidated / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"params\.json: field 'n_heads' must be a number"):
        load_model(consolidated)
    (consolidated / "params.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"params\.json: not valid JSON"):
        load_model(consolidated)


def test_index_lists_a_missing_shard(tmp_path):
    sharded = make_random(tmp_path / "s", ARGS, "hf", "float32", seed=3, shard_bytes=20_000, tokenizer=False)
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=rf"{shard.name}: listed in model\.safetensors\.index\.json but missing"):
        load_model(sharded)


def test_weights_that_cannot_fit_are_refused_before_loading(consolidated, monkeypatch):
    """A conversion that needs more memory than there is gets a clear error, not the OOM killer.
    (The machine's free memory is what is faked here; the checkpoint and the loader are real.)"""
    import mistral.loader

    n = sum(p.numel() for p in load_model(consolidated).parameters())  # fp32 on the CPU: maps the file
    monkeypatch.setattr(mistral.loader, "_available_memory", lambda device: 3 * n)  # bytes; bf16 needs 2n
    assert load_model(consolidated, dtype="bfloat16").output.weight.dtype == torch.bfloat16
    monkeypatch.setattr(mistral.loader, "_available_memory", lambda device: n)
    with pytest.raises(CheckpointError, match=r"in bfloat16 on cpu, but only .* GiB is available"):
        load_model(consolidated, dtype="bfloat16")
    assert load_model(consolidated).output.weight.dtype == torch.float32  # the file's own dtype needs no copy


# Hostile or corrupt configs: each a one-line error naming the file and field, before anything is built.
BAD_PARAMS = [
    ("n_heads", "0", r"n_heads must be a positive integer, got 0"),
    ("dim", "1e400", r"field 'dim' must be a finite number, got inf"),
    ("dim", "Infinity", r"field 'dim' must be a finite number, got inf"),
    ("dim", "1e308", r"dim is ~2\*\*1023, past the limit of"),
    ("n_layers", "NaN", r"field 'n_layers' must be a finite number, got nan"),
    ("n_layers", "1000000", r"n_layers is 1000000, past the limit of 1024"),
    ("n_layers", "1000", r"1000 layers, but consolidated\.safetensors hold tensors of 2"),
    ("norm_eps", "Infinity", r"field 'norm_eps' must be a finite number"),
    ("rope_theta", "1e400", r"field 'rope_theta' must be a finite number"),
    ("vocab_size", "1" + "0" * 400, r"vocab_size is ~2\*\*1328, past the limit"),
]


@pytest.mark.parametrize("field, raw, message", BAD_PARAMS, ids=[f"{f}={r[:8]}" for f, r, _ in BAD_PARAMS])
def test_absurd_params_are_one_line_errors(consolidated, field, raw, message):
    params = json.loads((consolidated / "params.json").read_text())
    params[field] = "RAW"
    (consolidated / "params.json").write_text(json.dumps(params).replace('"RAW"', raw))
    with pytest.raises(CheckpointError, match=rf"params\.json: .*{message}") as e:
        load_model(consolidated)
    assert "\n" not in str(e.value)


def test_params_nested_too_deeply(consolidated):
    (consolidated / "params.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"params\.json: .*nested too deeply"):
        load_model(consolidated)


@pytest.mark.parametrize("shard", [0, None, "/etc/passwd", "../x.safetensors", "sub/x.safetensors"])
def test_index_names_no_shard_outside_the_folder(tmp_path, shard):
    sharded = make_random(tmp_path / "s", ARGS, "hf", "float32", seed=3, shard_bytes=20_000, tokenizer=False)
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["lm_head.weight"] = shard
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: weight_map names .* as a shard"):
        load_model(sharded)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_naming_the_tensor(consolidated, value):
    def poison(t):
        t["layers.1.attention.wv.weight"][3, 5] = value

    _rewrite(consolidated / "consolidated.safetensors", poison)
    with pytest.raises(CheckpointError, match=r"consolidated\.safetensors: tensor 'layers\.1\.attention\.wv\.weight' holds NaN or infinite"):
        load_model(consolidated)


def test_weights_too_large_for_the_asked_dtype(consolidated):
    _rewrite(consolidated / "consolidated.safetensors", lambda t: t["norm.weight"].fill_(1e6))
    assert load_model(consolidated, dtype="bfloat16").norm.weight[0] > 0  # bfloat16 has float32's range
    with pytest.raises(CheckpointError, match=r"tensor 'norm\.weight' holds NaN or infinite values once converted to float16"):
        load_model(consolidated, dtype="float16")


def test_float8_weights_are_refused(consolidated):
    _rewrite(consolidated / "consolidated.safetensors",
             lambda t: t.update({"output.weight": t["output.weight"].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=r"tensor 'output\.weight' has dtype float8_e4m3fn; this loader reads"):
        load_model(consolidated)


def test_the_defaults_of_transformers_are_not_used():
    """v0.3's figures, which MistralConfig's defaults get wrong, come from the preset / file."""
    args = preset("7b-v0.3")
    assert (args.norm_eps, args.rope_theta, args.sliding_window, args.vocab_size) == (1e-5, 1e6, None, 32768)


# --- the `mistral logits` contract ---------------------------------------------------------------


def test_logits_cli_matches_the_model(tmp_path, consolidated, hf):
    ids = [1, 3, 100, 4, 7]
    out_full, out_inc = tmp_path / "full.safetensors", tmp_path / "inc.safetensors"
    assert main(["logits", str(consolidated), "--tokens", ",".join(map(str, ids)), "--out", str(out_full)]) == 0
    assert main(["logits", str(hf), "--tokens", ",".join(map(str, ids)), "--incremental", "--out", str(out_inc)]) == 0
    full, inc = load_file(str(out_full)), load_file(str(out_inc))
    assert list(full) == ["logits"] and full["logits"].dtype == torch.float32
    assert full["logits"].shape == (len(ids), ARGS.vocab_size)

    from transformers import MistralForCausalLM

    oracle = MistralForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        expected = oracle(torch.tensor([ids])).logits[0]
    for got in (full["logits"], inc["logits"]):
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("tokens, message", [("1,x,3", "comma-separated integers"), ("", "empty"), ("1,999", "outside the vocabulary")])
def test_logits_cli_bad_tokens(tmp_path, consolidated, capsys, tokens, message):
    assert main(["logits", str(consolidated), "--tokens", tokens, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert message in capsys.readouterr().err


def test_logits_cli_bad_folder(tmp_path, capsys):
    assert main(["logits", str(tmp_path / "missing"), "--tokens", "1", "--out", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no such folder" in err and err.count("\n") == 1


@pytest.mark.parametrize("fmt, dtype, shard_bytes, digest", [
    ("consolidated", "bfloat16", 5 * 2**30, "46a44e4cd890e37919e503d0443e9ef943da01ce7e70678d74b75a41bd37f41e"),
    ("hf", "float32", 5 * 2**30, "43a7dd5e5749379ef72e34bfd92598edb83ca9de7d2c8ed4f139c5a3e0aecc3e"),
    ("hf", "float16", 40_000, "cb630994d9714940b8bceda4f7a1faa83cf10d3364f72725cb3a7f7288646eba"),  # sharded
])
def test_make_random_writes_the_same_bytes_for_a_seed(tmp_path, fmt, dtype, shard_bytes, digest):
    """The files of a seed never change (the digests are those of the version before the checkpoint's
    tensor list was read off the model): benchmarks compare revisions on them, and tests' checkpoints
    stay the same models."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, norm_eps=1e-5,
                     vocab_size=96, rope_theta=1e6)
    out = make_random(tmp_path, args, fmt, dtype, seed=7, shard_bytes=shard_bytes, tokenizer=False)
    h = hashlib.sha256()
    for f in sorted(out.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    assert h.hexdigest() == digest
