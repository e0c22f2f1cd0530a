"""The model against transformers' MistralForCausalLM on the same random weights (fp32)."""

import dataclasses

import pytest
import torch
from transformers import MistralForCausalLM

from mistral.args import ModelArgs
from mistral.kv_cache import PackedView
from mistral.loader import load_model
from mistral.make_random import make_random

TOL = 1e-5  # max |Δ| / max |logit|, fp32

BASE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
            norm_eps=1e-5, vocab_size=512, rope_theta=1e6)
CONFIGS = {
    "kv-ratio-1": ModelArgs(**{**BASE, "n_kv_heads": 4}),
    "kv-ratio-2": ModelArgs(**BASE),
    "kv-ratio-4": ModelArgs(**{**BASE, "n_heads": 8, "n_kv_heads": 2, "head_dim": 8}),
    "explicit-head-dim": ModelArgs(**{**BASE, "head_dim": 24}),  # n_heads * head_dim != dim
    "sliding-window": ModelArgs(**{**BASE, "sliding_window": 7}),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoints(request, tmp_path_factory):
    """The same random model written in both formats, and the transformers oracle loaded from the HF one."""
    args = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    consolidated = make_random(root / "consolidated", args, "consolidated", "float32", seed=7, tokenizer=False)
    hf = make_random(root / "hf", args, "hf", "float32", seed=7, tokenizer=False)
    oracle = MistralForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    return args, consolidated, hf, oracle


def tokens_for(args: ModelArgs, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, args.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fmt", ["consolidated", "hf"])
@torch.inference_mode()
def test_prefill_matches_transformers(checkpoints, fmt):
    args, consolidated, hf, oracle = checkpoints
    model = load_model(consolidated if fmt == "consolidated" else hf, quiet=True)
    tokens = tokens_for(args, 2, 19)  # longer than the sliding window, where there is one
    expected = oracle(tokens).logits
    assert rel_err(model(tokens), expected) <= TOL


@torch.inference_mode()
def test_incremental_decode_matches_transformers(checkpoints):
    args, consolidated, _, oracle = checkpoints
    model = load_model(consolidated, quiet=True)
    tokens = tokens_for(args, 1, 16, seed=1)
    expected = oracle(tokens).logits
    cache = model.new_cache(max_batch=1, max_seq_len=32)
    # a 5-token prefill, then one token at a time through the cache
    steps = [model(tokens[:, :5], torch.tensor([0]), cache)]
    for t in range(5, 16):
        steps.append(model(tokens[:, t : t + 1], torch.tensor([t]), cache))
    assert rel_err(torch.cat(steps, dim=1), expected) <= TOL


@torch.inference_mode()
def test_batch_rows_at_different_lengths(checkpoints):
    """Two rows of different lengths share a batch (right-padded) and then decode at different positions."""
    args, consolidated, _, oracle = checkpoints
    model = load_model(consolidated, quiet=True)
    long, short = tokens_for(args, 1, 14, seed=2)[0], tokens_for(args, 1, 6, seed=3)[0]
    cache = model.new_cache(max_batch=2, max_seq_len=24)
    padded = torch.stack([long, torch.cat([short, torch.zeros(8, dtype=torch.long)])])
    prefill = model(padded, torch.tensor([0, 0]), cache)
    assert rel_err(prefill[0], oracle(long[None]).logits[0]) <= TOL
    assert rel_err(prefill[1, :6], oracle(short[None]).logits[0]) <= TOL

    # one decode step with the rows at positions 14 and 6: the short row overwrites its padding
    nxt = tokens_for(args, 2, 1, seed=4)
    step = model(nxt, torch.tensor([14, 6]), cache)
    assert rel_err(step[0, 0], oracle(torch.cat([long, nxt[0]])[None]).logits[0, -1]) <= TOL
    assert rel_err(step[1, 0], oracle(torch.cat([short, nxt[1]])[None]).logits[0, -1]) <= TOL


@torch.inference_mode()
def test_paged_cache_matches_transformers(checkpoints):
    """The engine's paged cache (blocks of 4 positions, scattered over the pool): a prefill, decode steps,
    and a second sequence that reuses the first one's prompt blocks and prefills only the rest."""
    args, consolidated, _, oracle = checkpoints
    model = load_model(consolidated, quiet=True)
    cache = model.new_paged_cache(num_blocks=16, max_batch=2, max_seq_len=24, block_size=4)
    tokens = tokens_for(args, 1, 16, seed=6)
    first = torch.tensor([[9, 2, 14, 5]])  # 16 positions, in blocks out of order
    steps = [model(tokens[:, :9], torch.tensor([0]), cache.with_table(first, 9))]
    for t in range(9, 16):
        steps.append(model(tokens[:, t : t + 1], torch.tensor([t]), cache.with_table(first, t + 1)))
    assert rel_err(torch.cat(steps, dim=1), oracle(tokens).logits) <= TOL

    # the same first 8 tokens (blocks 9 and 2, shared), then a different tail in blocks of its own
    other = torch.cat([tokens[:, :8], tokens_for(args, 1, 5, seed=7)], dim=1)
    second = torch.tensor([[9, 2, 7, 11]])
    rest = model(other[:, 8:], torch.tensor([8]), cache.with_table(second, 13))
    assert rel_err(rest, oracle(other).logits[:, 8:]) <= TOL
    # and the first sequence's blocks were not touched: one more step of it is still right
    nxt = tokens_for(args, 1, 1, seed=8)
    step = model(nxt, torch.tensor([16]), cache.with_table(torch.tensor([[9, 2, 14, 5, 3]]), 17))
    assert rel_err(step[0, 0], oracle(torch.cat([tokens, nxt], dim=1)).logits[0, -1]) <= TOL


@torch.inference_mode()
def test_a_mixed_forward_equals_separate_forwards_and_transformers(checkpoints):
    """One forward (kv_cache.PackedView) carrying two decode rows at different lengths and two prompt
    chunks, one of them after a prefix it shares with the first row (blocks of 4, out of order, ragged
    tables): every row's logits equal those of its own forward, and transformers'."""
    args, consolidated, _, oracle = checkpoints
    model = load_model(consolidated, quiet=True)
    seqs = [tokens_for(args, 1, 13, seed=20), tokens_for(args, 1, 6, seed=21)]  # decode rows: 12 and 5 cached
    seqs += [torch.cat([seqs[0][:, :8], tokens_for(args, 1, 7, seed=22)], dim=1), tokens_for(args, 1, 3, seed=23)]
    tables = [[9, 2, 14, 5], [3, 12], [9, 2, 7, 11], [6]]  # the third shares the first's blocks 9 and 2
    cached = [12, 5, 8, 0]  # the chunks: positions 8..14 and 0..2

    def filled_cache():
        cache = model.new_paged_cache(num_blocks=16, max_batch=2, max_seq_len=16, block_size=4)
        for seq, table, n in zip(seqs[:2], tables, cached):
            model(seq[:, :n], torch.tensor([0]), cache.with_table(torch.tensor([table]), n))
        return cache

    def own_table(k):
        return torch.tensor([tables[k] + [0] * (4 - len(tables[k]))])

    cache = filled_cache()
    decode_table = torch.cat([own_table(0), own_table(1)])
    parts = [(slice(0, 2), cache.with_table(decode_table, 16), False), (slice(2, 9), cache.with_table(own_table(2), 15), True),
             (slice(9, 12), cache.with_table(own_table(3), 3), True)]
    tokens = torch.cat([seqs[0][0, 12:], seqs[1][0, 5:], seqs[2][0, 8:], seqs[3][0]])[:, None]  # [12, 1]
    positions = torch.tensor([12, 5, *range(8, 15), 0, 1, 2])
    mixed = model(tokens, positions, PackedView(parts))[:, 0]  # [12, V]

    cache = filled_cache()
    apart = [model(tokens[:2].view(2, 1), positions[:2], cache.with_table(decode_table, 16))[:, 0]]
    apart.append(model(tokens[2:9].view(1, 7), torch.tensor([8]), cache.with_table(own_table(2), 15))[0])
    apart.append(model(tokens[9:].view(1, 3), torch.tensor([0]), cache.with_table(own_table(3), 3))[0])
    assert rel_err(mixed, torch.cat(apart)) <= 1e-6
    expected = [oracle(seqs[0]).logits[0, 12:], oracle(seqs[1]).logits[0, 5:], oracle(seqs[2]).logits[0, 8:],
                oracle(seqs[3]).logits[0]]
    assert rel_err(mixed, torch.cat(expected)) <= TOL
    # narrowed to the rows whose logits a step samples from; not bitwise: a BLAS may block the output
    # matmul differently for 3 rows than for 12 (AMD EPYC's does)
    narrowed = model(tokens, positions, PackedView(parts), rows=torch.tensor([0, 1, 8]))[:, 0]
    assert narrowed.shape == (3, args.vocab_size) and rel_err(narrowed, mixed[[0, 1, 8]]) <= 1e-6


@torch.inference_mode()
def test_both_formats_give_identical_logits(checkpoints):
    args, consolidated, hf, _ = checkpoints
    tokens = tokens_for(args, 1, 9, seed=5)
    a = load_model(consolidated, quiet=True)(tokens)
    b = load_model(hf, quiet=True)(tokens)
    assert torch.equal(a, b)


BF16_TOL = 3e-2  # bf16 keeps 8 bits of mantissa; errors accumulate over the layers


@torch.inference_mode()
def test_bf16_on_cpu_close_to_fp32(tmp_path):
    args = CONFIGS["kv-ratio-2"]
    folder = make_random(tmp_path, args, "consolidated", "float32", seed=11, tokenizer=False)
    tokens = tokens_for(args, 2, 12, seed=6)
    fp32 = load_model(folder, quiet=True)(tokens)
    bf16_model = load_model(folder, dtype="bfloat16", quiet=True)
    assert bf16_model.output.weight.dtype == torch.bfloat16
    bf16 = bf16_model(tokens)
    assert bf16.dtype == torch.bfloat16
    assert rel_err(bf16, fp32) <= BF16_TOL


def test_bf16_checkpoint_loads_without_copy(tmp_path):
    """Loading a checkpoint in its own dtype on CPU maps the file instead of copying it."""
    folder = make_random(tmp_path, CONFIGS["kv-ratio-2"], "consolidated", "bfloat16", seed=1, tokenizer=False)
    model = load_model(folder, quiet=True)
    assert model.output.weight.dtype == torch.bfloat16
    assert not model.output.weight.requires_grad


def test_model_args_reject_nonsense():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        dataclasses.replace(CONFIGS["kv-ratio-2"], n_kv_heads=3)
    with pytest.raises(ValueError, match="head_dim must be even"):
        dataclasses.replace(CONFIGS["kv-ratio-2"], head_dim=15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_attention_gives_a_row_the_same_bits_at_any_longer_length(dtype):
    """The engine's fixed batch shape reads only as many positions as its longest row needs on the
    CPU, rounded up to a multiple of 16 (engine.py: `_attention_length`). That keeps a row's greedy
    output independent of its company only if its attention output does not change, bit for bit,
    when more masked positions are read. (It does change at lengths that are not multiples of 16 on
    an AVX-512 CPU: 104 against 112, say; vector loops have a tail there.)"""
    from mistral.ops import get_ops

    attention = get_ops("torch").attention
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D, L = 4, 8, 2, 32, 2208
    keys = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    values = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    xq = torch.randn(B, 1, H, D, generator=g).to(dtype)
    input_pos = torch.tensor([3, 700, 1030, 1499])
    for window in (None, 600):
        short = attention(xq, keys[:, :, :1504], values[:, :, :1504], input_pos, window)
        for length in (1520, 1536, 2048, L):
            longer = attention(xq, keys[:, :, :length], values[:, :, :length], input_pos, window)
            assert torch.equal(longer, short), f"length {length}, window {window}"
