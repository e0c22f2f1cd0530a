"""`mistral inspect`: the recorded attention and residual stream against transformers' own
(output_attentions / output_hidden_states, eager attention), the pass's logits against the normal
forward, and the files it writes."""

import json
import math

import pytest
import sentencepiece
import torch
from PIL import Image
from transformers import MistralForCausalLM

from mistral.args import ModelArgs, preset
from mistral.cli import main
from mistral.errors import MistralError
from mistral.inspection import explicit_attention, parse_indices, token_labels, trace, write_report
from mistral.loader import load_model
from mistral.make_random import make_random, v3_tokenizer_file
from mistral.model import TORCH_OPS
from mistral.tokenizer import Tokenizer

PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    folder = make_random(root / "consolidated", preset("small"), "consolidated", "float32", seed=3)
    model = load_model(folder, max_seq_len=64, quiet=True)
    tokenizer = Tokenizer.from_path(folder)
    ids = tokenizer.encode(PROMPT, bos=True)
    return folder, model, tokenizer, ids, trace(model, ids, token_labels(tokenizer, ids), top_k=3)


def test_recorded_pass_matches_transformers(setup, tmp_path):
    folder, model, _, ids, t = setup
    hf = make_random(tmp_path, preset("small"), "hf", "float32", seed=3, tokenizer=False)
    oracle = MistralForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.inference_mode():
        out = oracle(torch.tensor([ids]), output_attentions=True, output_hidden_states=True)
    assert len(t.attention) == len(out.attentions) == model.args.n_layers
    for ours, theirs in zip(t.attention, out.attentions):
        torch.testing.assert_close(ours, theirs[0], atol=1e-6, rtol=0)
    # transformers' hidden_states: the embeddings, then each layer's output, the last one after the final norm.
    for depth in range(model.args.n_layers):
        torch.testing.assert_close(t.residual[depth], out.hidden_states[depth][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.norm(t.residual[-1]), out.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t.logits, out.logits[0], atol=1e-5, rtol=1e-5)


def test_recording_reproduces_the_normal_forward_and_leaves_no_trace(setup):
    _, model, _, ids, t = setup
    with torch.inference_mode():
        normal = model(torch.tensor([ids]))[0]
    torch.testing.assert_close(t.logits, normal, atol=1e-5, rtol=1e-5)
    # The lens at the last depth is the model's own prediction.
    assert torch.equal(t.lens_ids[-1, :, 0], normal.argmax(-1))
    torch.testing.assert_close(t.lens_probs[-1], normal.softmax(-1).topk(3).values, atol=1e-6, rtol=0)
    # The normal path is back to what it was: the same ops everywhere, no hooks left behind.
    for module in model.modules():
        assert getattr(module, "ops", model.ops) is model.ops
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("window", [None, 3])
def test_explicit_attention_equals_the_fused_op(window):
    B, T, H, Hkv, D, L = 2, 5, 6, 2, 8, 11
    g = torch.Generator().manual_seed(0)
    xq = torch.randn(B, T, H, D, generator=g)
    keys, values = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    input_pos = torch.tensor([0, 4])  # rows at different positions; slots past them must not count
    kept = []
    out = explicit_attention(xq, keys, values, input_pos, window, record=kept.append)
    torch.testing.assert_close(out, TORCH_OPS.attention(xq, keys, values, input_pos, window), atol=1e-6, rtol=1e-5)
    probs = kept[0]  # [B, H, T, L]
    q_pos = input_pos[:, None, None, None] + torch.arange(T)[:, None]
    k_pos = torch.arange(L)
    hidden = (k_pos > q_pos) | ((k_pos <= q_pos - window) if window else False)
    assert probs[hidden.expand_as(probs)].abs().max() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, T))


def test_report_files(setup, tmp_path):
    _, model, tokenizer, ids, t = setup
    files = write_report(t, tmp_path, layers=[0, 1], heads=[0, 5], prompt=PROMPT, pieces=tokenizer.id_to_piece)
    names = sorted(f.name for f in files)
    assert names == ["attention_layer00.png", "attention_layer01.png", "inspect.json", "logit_lens.png",
                     "residual_norms.png"]
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            with Image.open(f) as image:
                image.verify()
            with Image.open(f) as image:
                assert image.size[0] > 300 and image.size[1] > 200

    data = json.loads((tmp_path / "inspect.json").read_text())
    T = len(ids)
    assert data["tokens"] == ids and data["prompt"] == PROMPT
    sp = sentencepiece.SentencePieceProcessor(model_file=str(v3_tokenizer_file()))
    assert data["labels"] == [sp.id_to_piece(i) for i in ids] and data["labels"][0] == "<s>"
    assert [(m["layer"], m["head"], m["kv_head"]) for m in data["attention"]["maps"]] == [
        (0, 0, 0), (0, 5, 1), (1, 0, 0), (1, 5, 1)]  # 8 query heads over 2 KV heads: 4 per group
    for m in data["attention"]["maps"]:
        probs = m["probs"]
        assert len(probs) == T and all(len(row) == T for row in probs)
        for i, row in enumerate(probs):
            assert abs(sum(row) - 1) <= 1e-5
            assert all(p == 0 for p in row[i + 1:])  # causal: nothing from the future
            assert all(p > 0 for p in row[: i + 1])
    lens = data["logit_lens"]
    assert [d["after"] for d in lens] == ["embeddings", "layer 0", "layer 1"]
    with torch.inference_mode():
        expected = model(torch.tensor([ids]))[0].argmax(-1).tolist()
    assert [pos[0]["id"] for pos in lens[-1]["top"]] == expected
    assert all(pos[0]["piece"] == sp.id_to_piece(pos[0]["id"]) for pos in lens[0]["top"])
    norms = torch.tensor(data["residual_norms"]["norms"])
    assert norms.shape == (3, T)
    torch.testing.assert_close(norms[0], model.tok_embeddings(torch.tensor(ids)).norm(dim=-1))


def test_cli(setup, tmp_path, capsys):
    folder = setup[0]
    assert main(["inspect", str(folder), "--prompt", "Hello world", "--layers", "1", "--heads", "2",
                 "--out", str(tmp_path / "a")]) == 0
    assert "next token" in capsys.readouterr().out
    data = json.loads((tmp_path / "a" / "inspect.json").read_text())
    assert data["tokens"][0] == 1 and [(m["layer"], m["head"]) for m in data["attention"]["maps"]] == [(1, 2)]
    assert (tmp_path / "a" / "attention_layer01.png").is_file()
    # Bad input: one line on stderr, exit status 2, nothing written.
    for argv, message in [
        (["--prompt", "x", "--layers", "2"], "the model has 2 layers"),
        (["--prompt", "x", "--heads", "1-x"], "not an index"),
        (["--tokens", "1,99999"], "outside the vocabulary"),
        (["--tokens", "1,2", "--chat"], "--chat"),
    ]:
        assert main(["inspect", str(folder), *argv, "--out", str(tmp_path / "b")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bad_input():
    assert parse_indices("all", 4, "heads") == [0, 1, 2, 3]
    assert parse_indices("3, 0-1,1", 4, "heads") == [3, 0, 1]
    for text in ("", "4", "-1", "2-1", "a"):
        with pytest.raises(MistralError):
            parse_indices(text, 4, "heads")
    from mistral.model import Transformer

    model = Transformer(ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, hidden_dim=32,
                                  norm_eps=1e-5, vocab_size=50, rope_theta=1e4), max_seq_len=8)
    for tokens, message in [([], "no tokens"), ([1, 50], "outside the vocabulary"), (list(range(9)), "max_seq_len")]:
        with pytest.raises(MistralError, match=message):
            trace(model, tokens)
    assert math.isclose(trace(model, [1, 2]).attention[0][0, 1].sum().item(), 1.0, rel_tol=1e-6)
