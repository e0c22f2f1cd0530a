"""Token events from the engine's thread to the asyncio loops that stream them, one step at a time.

The engine's thread hands each event to its consumer's event loop (`loop.call_soon_threadsafe`).
Left alone, the loop often does not run before the engine's next step starts: the step's Python and
its compiled kernels (inductor's generated C++ is called with the GIL held) keep the GIL, so the loop
gets to write its stream's token only when that step is over, together with the next token. A client
then sees two tokens at once: one gap of two steps, one of ~0, and the p99 gap doubles.

`Handoff.flush()`, which the engine's thread calls after each step (`Engine.serve_forever`), waits
until every loop it sent events to since the last flush has run them and the callbacks they woke
(the consumer's task: its chunk built and written), at most `wait_s` in all, so that each token
leaves before the next forward. A loop is done when a marker callback, sent after the events, has
gone `hops` times round the loop's queue of ready callbacks: once to run after the events, once more
after the task each event woke, and once more for a hop inside the stream (a task group, a queue).

Only the engine's thread calls `send` and `flush`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, Callable


class Handoff:
    def __init__(self, wait_s: float = 0.005, hops: int = 3):
        if wait_s < 0 or hops < 1:
            raise ValueError(f"Handoff needs wait_s >= 0 and hops >= 1, got {wait_s} and {hops}")
        self.wait_s, self.hops = wait_s, hops
        self._loops: dict[asyncio.AbstractEventLoop, None] = {}  # sent to since the last flush, in order

    def send(self, loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback(*args)` on `loop`, soon (`call_soon_threadsafe`); `flush` waits for it."""
        loop.call_soon_threadsafe(callback, *args)
        self._loops[loop] = None

    def flush(self) -> None:
        """Wait (at most `wait_s` in all) until the loops sent to since the last flush have run what
        was sent and what it woke. A closed loop is not waited for."""
        loops, self._loops = self._loops, {}
        if not loops or self.wait_s == 0:
            return
        deadline = time.monotonic() + self.wait_s
        for loop in loops:
            done = threading.Event()
            try:
                loop.call_soon_threadsafe(_go_round, loop, done, self.hops)
            except RuntimeError:  # the loop is closed
                continue
            if not done.wait(max(0.0, deadline - time.monotonic())):
                return  # out of time: the other loops are not waited for either


def _go_round(loop: asyncio.AbstractEventLoop, done: threading.Event, hops: int) -> None:
    """On `loop`: after `hops` rounds of its ready callbacks, set `done`."""
    if hops <= 1:
        done.set()
    else:
        loop.call_soon(_go_round, loop, done, hops - 1)
