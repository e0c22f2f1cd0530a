"""Prompt chunks through torch.compile (`Engine(compile=True, prefill_chunk=C)`, prefill_step.py), on a
tiny random model. Oracles: the same prompts on an eager engine, and dynamo's own cache of the graphs
it compiled for the chunk forward."""

import pytest
import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from mistral.engine import Engine, GenerationParams
from mistral.kv_cache import BlockPool
from mistral.prefill_step import PrefillStep
from test_prefix_cache import model, run, tokens  # noqa: F401 (the module's tiny model fixture)

GREEDY = GenerationParams(max_tokens=4, temperature=0.0, ignore_eos=True)


def recorded(engine: Engine) -> list[tuple[int, int, torch.Tensor]]:
    """(start, chunk length, logits) of every chunk the engine reads, through its own prefill step."""
    calls, step = [], engine.prefill_step.__call__

    def record(tokens, start, table, stop, key=None):
        logits = step(tokens, start, table, stop, key)
        calls.append((start, tokens.shape[1], logits.clone()))
        return logits

    engine.prefill_step = record
    return calls


@pytest.fixture(scope="module")
def compiled(model):  # noqa: F811
    engine = Engine(model, max_batch=2, prefill_chunk=16, fixed_batch_shape=True, compile=True)
    run(engine, [tokens(1, 5)])  # compiles the decode step
    engine.prefill_step.warm_up()
    assert len(graphs()) == 2  # chunks of 2-4 tokens, and longer ones, at every position (PrefillStep.warm_up)
    return engine


def graphs() -> list:
    """The compiled graphs of the chunk forward (one per set of guards)."""
    return _debug_get_cache_entry_list(PrefillStep._forward.__code__)


def test_compiled_chunks_equal_eager_ones_on_the_paged_cache(model, compiled):  # noqa: F811
    """Every chunk is compiled, the last, shorter one too; every chunk's logits equal an eager
    engine's to fp32 rounding, after a cached prefix too, and the greedy answers are the same."""
    eager = Engine(model, max_batch=2, prefill_chunk=16, fixed_batch_shape=True)
    first = tokens(2, 48)
    second = first + tokens(3, 45)  # reads its first 48 tokens from the prefix cache
    ps = compiled.prefill_step
    compiled_calls = []
    inner = ps.compiled
    ps.compiled = lambda chunk, stop: compiled_calls.append(stop) or inner(chunk, stop)
    try:
        got, want = recorded(compiled), recorded(eager)
        answers = [run(engine, [first, second]) for engine in (compiled, eager)]
    finally:
        ps.compiled, compiled.prefill_step, eager.prefill_step = inner, ps, eager.prefill_step
    assert [a for a, _, _ in answers[0]] == [a for a, _, _ in answers[1]]
    assert answers[0][1][1].cached_tokens == 48
    assert [(s, n) for s, n, _ in got] == [(s, n) for s, n, _ in want] == [
        (0, 16), (16, 16), (32, 16), (48, 16), (64, 16), (80, 13)]
    assert compiled_calls == [16, 32, 48, 64, 80, 93]  # every chunk, the last, shorter one too, by where it stops
    for (_, _, a), (_, _, b) in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_one_compilation_serves_every_position_and_prompt_length(compiled):
    """After the warm-up, no chunk compiles again (nor did the previous test's)."""
    run(compiled, [tokens(4, 40), tokens(5, 77), tokens(6, 130), tokens(4, 40) + tokens(7, 33), tokens(9, 49)])
    assert len(graphs()) == 2
    assert compiled.prefill_step.compiled is not None  # still compiled: nothing fell back to eager


def test_chunks_register_each_block_hash_once():
    """A prompt registered chunk by chunk with its known hashes caches the same chains as one registered
    whole, and hashes each block once."""
    prompt = tokens(8, 100)
    whole, chunked = BlockPool(16), BlockPool(16)
    whole.register(list(range(1, 8)), prompt)
    known, hashed = [], []
    sha = chunked._hashes

    def counting(tokens, known=None):
        before = len(known)
        yield from sha(tokens, known)
        hashed.append(len(known) - before)

    chunked._hashes = counting
    for stop in (16, 40, 64, 100):
        chunked.register(list(range(1, 8)), prompt[:stop], known)
    assert chunked.cached == whole.cached and chunked.hash_of == whole.hash_of
    assert hashed == [1, 1, 2, 2] and known == list(whole._hashes(prompt))


def test_the_contiguous_copy_follows_sequences_that_take_turns(model):  # noqa: F811
    """A long prompt's chunks with short prompts read between them (each takes the contiguous copy of
    keys and values, kv_cache.StagedView, so the long one's is filled again from the pool): every
    chunk's logits, and every answer, are exactly those of the prompt read alone."""
    long, shorts = tokens(10, 70), [tokens(11, 5), tokens(12, 3)]
    alone = Engine(model, max_batch=4, prefill_chunk=16, fixed_batch_shape=True)
    calls_alone = recorded(alone)
    want = [run(alone, [p])[0][0] for p in [long, *shorts]]
    together = Engine(model, max_batch=4, prefill_chunk=16, fixed_batch_shape=True)
    fills = []
    ps = together.prefill_step
    real = type(together.cache).copy_in

    def counted(view, k, v):
        fills.append(view.length)
        real(view, k, v)

    type(together.cache).copy_in = counted
    try:
        calls = recorded(together)
        got = [a for a, _, _ in run(together, [long, *shorts], together=True)]
    finally:
        type(together.cache).copy_in = real
    assert got == want
    assert ps.copy_k is not None and 0 < len(fills)  # the long prompt's copy was filled again
    long_calls = [c for c in calls if c[1] == 16 or c[0] + c[1] == 70]
    for (s, n, a), (s2, n2, b) in zip(long_calls, [c for c in calls_alone if c[1] == 16 or c[0] + c[1] == 70]):
        assert (s, n) == (s2, n2)
        assert torch.equal(a, b)


def test_chunks_shrink_past_the_decay_position(model):  # noqa: F811
    """With prefill_chunk_decay d, a chunk starting past position d reads prefill_chunk x d / position
    tokens (at least 2); the answers alone and in company stay the same."""
    prompt, other = tokens(13, 130), tokens(14, 20)
    engine = Engine(model, max_batch=4, prefill_chunk=16, prefill_chunk_decay=32, fixed_batch_shape=True)
    assert [engine.chunk_at(p) for p in (0, 32, 33, 48, 64, 100, 255, 10_000)] == [16, 16, 15, 10, 8, 5, 2, 2]
    calls = recorded(engine)
    alone = [run(engine, [p])[0][0] for p in (prompt, other)]
    start, want = 0, []
    while start < len(prompt):
        want.append((start, min(engine.chunk_at(start), len(prompt) - start)))
        start += want[-1][1]
    assert want[:5] == [(0, 16), (16, 16), (32, 16), (48, 10), (58, 8)]
    assert [(s, n) for s, n, _ in calls] == want + [(0, 16), (16, 4)]
    engine = Engine(model, max_batch=4, prefill_chunk=16, prefill_chunk_decay=32, fixed_batch_shape=True)  # nothing cached
    calls = recorded(engine)
    together = [a for a, _, _ in run(engine, [prompt, other], together=True)]
    assert together == alone
    assert sorted((s, n) for s, n, _ in calls) == sorted(want + [(0, 16), (16, 4)])  # cut the same way in company


def test_prefill_chunk_decay_needs_prefill_chunk(model):  # noqa: F811
    with pytest.raises(ValueError, match="prefill_chunk_decay"):
        Engine(model, max_batch=2, prefill_chunk_decay=64)
