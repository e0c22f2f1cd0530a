"""Each step's tokens leave before the next step starts (handoff.py), on a tiny random model: the
engine's thread (`serve_forever`) streaming to consumers on a real asyncio loop. Oracle: the step
each token was emitted in, against the step that was running when its consumer got it."""

import asyncio
import threading
import time

import pytest

from mistral.engine import Engine, FinishEvent, GenerationParams
from mistral.handoff import Handoff
from test_engine import model  # noqa: F401 (the module's tiny model fixture)

STREAM = GenerationParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def streamed(engine: Engine, handoff: Handoff, streams: int, busy_s: float) -> list[list[tuple[int, int]]]:
    """Run `streams` sequences on an engine thread; each consumer task holds its loop `busy_s` per
    token (as building and writing a chunk does). Per stream, (step emitted in, step running when
    consumed) of each token."""
    started = [0]  # steps begun by the engine's thread
    step = engine.step

    def counted():
        started[0] += 1
        step()

    engine.step = counted
    stop = threading.Event()

    async def main():
        loop = asyncio.get_running_loop()

        async def consume(queue):
            got = []
            while True:
                event, emitted = await queue.get()
                if isinstance(event, FinishEvent):
                    return got
                got.append((emitted, started[0]))
                time.sleep(busy_s)  # holds the loop (not the GIL)

        queues = [asyncio.Queue() for _ in range(streams)]
        for q in queues:
            engine.add([1, 5, 7, 9], STREAM, lambda ev, q=q: handoff.send(loop, q.put_nowait, (ev, started[0])))
        thread = threading.Thread(target=engine.serve_forever, args=(stop, handoff.flush), daemon=True)
        thread.start()
        try:
            return await asyncio.gather(*(consume(q) for q in queues))
        finally:
            stop.set()
            engine.wake()
            await asyncio.to_thread(thread.join)

    try:
        return asyncio.run(main())
    finally:
        engine.step = step


@pytest.mark.parametrize("streams", [1, 3])
def test_each_token_is_consumed_before_the_next_step(model, streams):  # noqa: F811
    engine = Engine(model, max_batch=4, fixed_batch_shape=True)
    got = streamed(engine, Handoff(wait_s=2.0), streams, busy_s=0.003)
    for tokens in got:
        assert len(tokens) == STREAM.max_tokens
        assert [emitted for emitted, _ in tokens] == [consumed for _, consumed in tokens]


def test_without_the_wait_tokens_are_consumed_late(model):  # noqa: F811
    """The oracle can fail: with no wait, a busy consumer gets its tokens steps after they were made."""
    engine = Engine(model, max_batch=4, fixed_batch_shape=True)
    (tokens,) = streamed(engine, Handoff(wait_s=0), 1, busy_s=0.01)
    assert any(emitted != consumed for emitted, consumed in tokens)


def test_a_slow_loop_holds_the_engine_back_at_most_wait_s():
    """A loop that does not run (here: not running at all) costs a flush `wait_s`, no more."""
    loop = asyncio.new_event_loop()
    try:
        handoff = Handoff(wait_s=0.05)
        handoff.send(loop, lambda: None)
        start = time.perf_counter()
        handoff.flush()
        assert 0.04 < time.perf_counter() - start < 0.5
        start = time.perf_counter()
        handoff.flush()  # nothing sent since: no wait
        assert time.perf_counter() - start < 0.01
        handoff.send(loop, lambda: None)
    finally:
        loop.close()
    start = time.perf_counter()
    handoff.flush()  # a closed loop refuses the marker: it is not waited for
    assert time.perf_counter() - start < 0.01
