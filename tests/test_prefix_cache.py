"""The paged KV cache's scheduling: prefix caching, a pool smaller than the rows, chunked prefill,
on a tiny random model. Oracles: the same sequence on an engine without prefix caching or chunking, and
the block pool's bookkeeping checked against what was run."""

import torch
import pytest

from mistral.engine import Engine, EngineStats, GenerationParams, TokenEvent
from mistral.kv_cache import BlockPool, bytes_per_block
from mistral.loader import load_model
from mistral.make_random import make_random
from test_engine import ARGS
GREEDY = GenerationParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_random(tmp_path_factory.mktemp("paged"), ARGS, "consolidated", "float32", seed=5, tokenizer=False)
    return load_model(folder, device="cpu", kernels="torch", max_seq_len=256, quiet=True)


def run(engine: Engine, prompts: list[list[int]], params: GenerationParams = GREEDY, together: bool = False):
    """Each prompt's tokens and finish event, one after another (or all queued at once)."""
    out = []

    def submit(prompt):
        events = []
        out.append((engine.add(prompt, params, events.append), events))

    for prompt in prompts:
        submit(prompt)
        if not together:
            engine.run_until_idle()
    engine.run_until_idle()
    return [([e.token for e in evs if isinstance(e, TokenEvent)], evs[-1], seq) for seq, evs in out]


def tokens(seed: int, n: int) -> list[int]:
    return torch.randint(3, ARGS.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_block_pool_reuses_chains_and_evicts_least_recently_used():
    pool = BlockPool(num_blocks=5, block_size=2)  # 4 usable blocks
    a = pool.acquire([], 3)
    pool.register(a, [1, 2, 3, 4, 5])  # two full blocks; the third holds one token and stays private
    pool.release(a)
    assert pool.match([1, 2, 3, 4, 9]) == a[:2] and pool.match([1, 2, 7, 4]) == a[:1]
    assert pool.match([9, 2, 3, 4]) == []  # the second block's hash is chained to the first's tokens
    assert pool.used == 2  # the cached blocks stay in the pool
    b = pool.acquire(pool.match([1, 2, 3, 4]), 2)  # reuse both, and take the 2 blocks left free
    assert b[:2] == a[:2] and pool.used == 4 and not pool.can_allocate([], 1)
    pool.release(b)
    c = pool.acquire([], 4)  # everything: the cached blocks are evicted, the chain's tail first
    assert sorted(c) == [1, 2, 3, 4] and pool.match([1, 2, 3, 4]) == []


def test_a_shared_prefix_is_reused_and_greedy_output_is_unchanged(model):
    system = tokens(1, 40)
    prompts = [system + tokens(2, 5), system + tokens(3, 9), system[:37]]
    cached = run(Engine(model, max_batch=2, fixed_batch_shape=True), prompts)
    plain = run(Engine(model, max_batch=2, fixed_batch_shape=True, prefix_caching=False), prompts)
    assert [t for t, _, _ in cached] == [t for t, _, _ in plain]
    assert [seq.cached for _, _, seq in cached] == [0, 32, 32]  # whole 16-token blocks of the 40 shared
    assert [fin.cached_tokens for _, fin, _ in cached] == [0, 32, 32]
    assert [seq.cached for _, _, seq in plain] == [0, 0, 0]


def test_a_conversation_reuses_the_answer_it_generated(model):
    engine = Engine(model, max_batch=1)
    first = tokens(4, 30)
    [(answer, _, _)] = run(engine, [first], GenerationParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    # the next turn: the whole first exchange (of which 49 positions were written), then the new message
    [(_, _, seq)] = run(engine, [first + answer + tokens(5, 6)])
    assert seq.cached == 48
    s = engine.stats()
    assert isinstance(s, EngineStats)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (30 + 56, 48)
    assert (s.waiting, s.running) == (0, 0) and s.kv_blocks_used == 3 and s.kv_blocks_total == 16  # 63 written: 3 full blocks


def test_the_last_prompt_token_is_always_computed(model):
    engine = Engine(model, max_batch=1)
    prompt = tokens(6, 32)  # exactly two blocks
    first, second = run(engine, [prompt, prompt])
    assert second[2].cached == 16 and first[0] == second[0]


def test_a_pool_smaller_than_the_rows_makes_requests_wait(model):
    block = bytes_per_block(ARGS, 16, torch.float32)
    engine = Engine(model, max_batch=4, kv_cache_gb=3 * block / 2**30, fixed_batch_shape=True)  # 48 positions
    prompts = [tokens(10 + k, 20) for k in range(3)]  # 20 + 8 positions: 2 blocks each, one sequence at a time
    together = run(engine, prompts, together=True)
    alone = run(Engine(model, max_batch=4, fixed_batch_shape=True), prompts)
    assert [t for t, _, _ in together] == [t for t, _, _ in alone]
    assert all(fin.reason == "length" for _, fin, _ in together)


def test_a_sequence_that_can_never_fit_gets_a_clear_error(model):
    block = bytes_per_block(ARGS, 16, torch.float32)
    engine = Engine(model, max_batch=2, kv_cache_gb=2 * block / 2**30)
    [(got, fin, _)] = run(engine, [tokens(20, 30)])
    assert got == [] and fin.reason == "error"
    assert "the prompt has 30 tokens" in fin.message and "32 positions (2 blocks of 16)" in fin.message
    [(got, fin, _)] = run(engine, [tokens(21, 10)])  # the engine goes on serving what fits
    assert len(got) == 8 and fin.reason == "length"


def test_chunked_prefill_lets_running_rows_decode_meanwhile(model):
    engine = Engine(model, max_batch=2, prefill_chunk=16, fixed_batch_shape=True)
    log = []
    engine.add(tokens(30, 4), GenerationParams(max_tokens=60, temperature=0.0, ignore_eos=True),
               lambda ev: log.append("stream"))
    engine.step()  # the stream is running
    long_prompt = tokens(31, 150)
    engine.add(long_prompt, GREEDY, lambda ev: log.append("long"))
    engine.run_until_idle()
    before_first = log[: log.index("long")]
    assert before_first.count("stream") >= 150 // 16  # a token of the stream for every chunk read
    # and the chunks add up to the same answer as one prefill
    [(chunked, _, _)] = run(Engine(model, max_batch=1, prefill_chunk=16), [long_prompt])
    [(whole, _, _)] = run(Engine(model, max_batch=1), [long_prompt])
    assert chunked == whole


def test_streams_decoding_while_a_long_prompt_is_read_get_their_tokens_alone(model):
    """Mixed steps: while a long prompt is read in chunks, each in the same forward as the streams'
    decode step, every stream's greedy tokens are those it gets alone, and the long
    prompt's answer is that of one prefill on an idle engine. (Exact at this width; at others a mixed
    step's matmuls may round a decode row differently, which is why a fixed batch shape leaves
    mixed steps off by default: see engine.py.)"""
    params = GenerationParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True)
    assert Engine(model, max_batch=2).mixed_prefill and not Engine(model, max_batch=2, fixed_batch_shape=True).mixed_prefill
    engine = Engine(model, max_batch=4, prefill_chunk=16, fixed_batch_shape=True, mixed_prefill=True)
    mixed = []
    with_chunks = engine.decode_step.with_chunks
    engine.decode_step.with_chunks = lambda *a: mixed.append(len(a[3])) or with_chunks(*a)
    streams = [tokens(40 + k, 4 + k) for k in range(3)]  # 15 tokens: read in the first step
    events = [[] for _ in streams]
    for prompt, evs in zip(streams, events):
        engine.add(prompt, params, evs.append)
    engine.step()  # the streams are running
    long_prompt, long_events = tokens(50, 150), []
    engine.add(long_prompt, GREEDY, long_events.append)
    engine.run_until_idle()
    assert mixed == [1] * -(-150 // 16)  # every chunk rode along with the streams' decode step
    for prompt, evs in zip(streams, events):
        [(alone, _, _)] = run(Engine(model, max_batch=4, fixed_batch_shape=True), [prompt], params)
        got = [e for e in evs if isinstance(e, TokenEvent)]
        assert [e.token for e in got] == alone
    [(whole, _, _)] = run(Engine(model, max_batch=1), [long_prompt])
    assert [e.token for e in long_events if isinstance(e, TokenEvent)] == whole


def test_a_mixed_step_that_fails_reruns_apart_and_fails_only_the_bad_prompt(model):
    """A prompt the model cannot embed (an id past the vocabulary) fails the mixed forward it rides in:
    the step runs again apart, the prompt gets its error and the streams decode on untouched."""
    engine = Engine(model, max_batch=3, prefill_chunk=16, fixed_batch_shape=True, mixed_prefill=True)
    stream = []
    engine.add(tokens(60, 6), GREEDY, stream.append)
    engine.step()
    bad = []
    engine.add([1, ARGS.vocab_size + 5], GREEDY, bad.append)
    engine.run_until_idle()
    assert bad[-1].reason == "error" and "index" in bad[-1].message.lower() and len(bad) == 1
    [(alone, _, _)] = run(Engine(model, max_batch=3, fixed_batch_shape=True), [tokens(60, 6)])
    assert [e.token for e in stream if isinstance(e, TokenEvent)] == alone and stream[-1].reason == "length"
