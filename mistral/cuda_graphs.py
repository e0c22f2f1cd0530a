"""CUDA graphs for the decode step: record its kernel launches once per batch size, replay them.

At batch 1 the GPU spends about 5 ms on a 7B decode step (reading 14.2 GB of weights), but the
step is several hundred small kernels, and eager PyTorch spends 5-20 µs of Python and driver time
launching each one: the host, not the GPU, sets the pace. A CUDA graph records the launches of one step with
their arguments (pointers included) and replays all of them with one call.

What a captured step must obey, since the replay repeats exactly what was recorded:

* Fixed addresses. Inputs are read from tensors that live for the whole run (the engine's `tokens`,
  `pos`, sampling settings and KV cache), outputs land in tensors the graph itself allocated, which
  each replay overwrites. Values change between replays; addresses and shapes never do.
* No host synchronisation: no `.item()`, `.tolist()`, or shapes that depend on tensor values.
  Positions are read on the device (the Triton decode kernel reads each row's length from `pos`),
  which is also why a graph covers the full cache length at no extra cost.
* Host-side choices are part of the graph. A step that branches on host values (the batch size,
  which sampling features the batch uses) needs one graph per branch: `CapturedSteps` keys its
  graphs by (batch bucket, key) and captures each on first use.

Batch sizes are rounded up to buckets (1, 2, 4, 8, ..., max_batch): rows past the requested ones
are idle rows that compute garbage nobody reads, which costs little at small batch since the
weights are read once for all rows. All graphs share one memory pool: they never run at the same
time, so their temporaries may share memory; the outputs of every graph stay allocated.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable

import torch

log = logging.getLogger("mistral")

Step = Callable[[int, Hashable], tuple[torch.Tensor, ...]]


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The batch sizes that get a graph: powers of two below max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n rows."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} rows exceed the largest batch bucket, {buckets[-1]}")


class CapturedSteps:
    """Capture `step(batch, key)` as a CUDA graph per (batch bucket, key); replay it on later calls.

    `step` runs one decode step for rows 0..batch-1, reading only persistent tensors, and returns
    its output tensors. It is run eagerly `warmup` times before each capture (Triton compiles its
    kernels and cuBLAS picks its algorithms then, neither of which may happen during capture), so
    it must have no effect that those extra runs would spoil: the engine's step only recomputes the
    current position's keys and values, which the real step then writes again.

    Calling returns the outputs of the bucket's graph (`bucket` rows each; the first n are the
    caller's), or None when graphs are off: after a failed capture (logged once, with the reason in
    `disabled`) or once `max_graphs` are held. The caller then runs its eager step.
    """

    def __init__(self, step: Step, max_batch: int, *, warmup: int = 2, max_graphs: int = 64):
        self.step = step
        self.buckets = batch_buckets(max_batch)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[int, Hashable], tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]] = {}
        self.pool = None  # the memory pool all graphs share, created with the first
        self.disabled: str | None = None
        self.replays = 0

    def bucket(self, n: int) -> int:
        return bucket_for(n, self.buckets)

    def __call__(self, n: int, key: Hashable = None) -> tuple[torch.Tensor, ...] | None:
        if self.disabled is not None:
            return None
        batch = self.bucket(n)
        entry = self.graphs.get((batch, key))
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return None  # an unusual mix of settings: run it eagerly rather than hold more graphs
            try:
                entry = self.graphs[(batch, key)] = self._capture(batch, key)
            except Exception as e:  # a capture that fails must not take generation down with it
                self.disabled = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed for batch %d (%s); decoding eagerly from now on", batch, self.disabled)
                return None
        graph, outputs = entry
        graph.replay()
        self.replays += 1
        return outputs

    def _capture(self, batch: int, key: Hashable) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
        # Warm up on a side stream, as PyTorch asks: work done there is not mixed into the
        # default stream's memory pool, and lazy initialisation happens outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step(batch, key)
        torch.cuda.current_stream().wait_stream(side)

        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # thread_local: the engine may run on a background thread (the server's); only this
        # thread's forbidden calls (a sync, say) should break the capture, not other threads' work.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            outputs = tuple(self.step(batch, key))
        log.info("captured a CUDA graph of the decode step: batch %d, key %s", batch, key)
        return graph, outputs
