"""A prompt chunk's forward, compiled: how a long prompt is read on the CPU between decode steps.

With `prefill_chunk` C, the engine reads a long prompt C tokens a step between the running rows'
decode steps. Eagerly, a chunk of 16-64 tokens on a small model costs mostly the few hundred ops'
dispatch, not their work: about as much as a compiled decode step, which the rows then wait for
on top of their own. Compiled, a chunk is one call into a few fused loops around the matmuls and
attention.

Every chunk of 2 to C tokens goes through torch.compile: tokens [1, T] (T dynamic), its
sequence's block table padded to the whole table's width [1, max_seq_len / block_size] with the
scratch block (kv_cache.py), copied into a buffer of fixed shape, and the number of positions
attention reads (an int, dynamic). Attention reads the sequence's keys and values from a contiguous
copy (kv_cache.StagedView), not from blocks gathered at every chunk. So two compilations (`warm_up`)
serve every chunk of every prompt at every position, a prompt's last, shorter chunk included: one
for chunks of 2-4 tokens (ops.cpu_linear's product of a few rows) and one for longer ones. A
one-token chunk (dynamo would specialize a dimension of 1) runs eagerly. A compiled chunk's logits
may differ from an eager chunk's in the last bits, as a prompt read after a cached prefix differs
from one read whole (README: prefix caching), but a prompt's chunks are cut the same way whatever
else runs, so its numbers never depend on its company.
"""

from __future__ import annotations

import logging

import torch

from .decode_step import TRACE_CONFIG
from .kv_cache import PagedKVCache, StagedView
from .model import Transformer

log = logging.getLogger("mistral")


class PrefillStep:
    """`step(tokens, start, table, stop, key)`: tokens [1, T] at positions start.. written through `table`
    ([1, n] blocks of one sequence, `key` its id); the logits of the last one [1, V]. Chunks of 2 to
    `size` tokens go through torch.compile, others (and all, after a compiled chunk failed) run eagerly.

    With `size`, attention reads the sequence's keys and values from a contiguous copy of one
    sequence (kv_cache.StagedView: [1, Hkv, max_seq_len, D] a layer, 1 / max_batch of a full pool),
    which each chunk extends; it is filled from the pool when a chunk is not the next one of the
    sequence it holds (a cached prefix, another sequence's chunks in between, a `key` of None)."""

    def __init__(self, model: Transformer, cache: PagedKVCache, size: int | None, compile: bool):
        self.model, self.cache, self.size = model, cache, size
        dev = cache.block_table.device
        self.copy_k = self.copy_v = None
        self.copied: tuple[int | None, int] = (None, 0)  # (key, positions) of what the copy holds
        if size is not None:
            pool = cache.k[0]  # [num_blocks, block_size, Hkv, D]
            shape = (1, pool.shape[2], cache.max_seq_len, pool.shape[3])
            self.copy_k = [torch.zeros(shape, dtype=pool.dtype, device=dev) for _ in cache.k]
            self.copy_v = [torch.zeros(shape, dtype=pool.dtype, device=dev) for _ in cache.v]
        self.compiled = None
        if compile and size is not None and size > 1:
            self.start = torch.zeros(1, dtype=torch.long, device=dev)
            self.table = torch.zeros(1, cache.block_table.shape[1], dtype=torch.long, device=dev)
            for t in (self.start, self.table, *self.copy_k, *self.copy_v):
                torch._dynamo.mark_static(t)
            self.compiled = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def __call__(self, tokens: torch.Tensor, start: int, table: torch.Tensor, stop: int,
                 key: int | None = None) -> torch.Tensor:
        if self.copy_k is not None:
            if key is None or self.copied != (key, start):
                self.cache.with_table(table, start).copy_in(self.copy_k, self.copy_v)
            self.copied = (None, 0)  # until this chunk is in
        logits = self._chunk(tokens, start, table, stop)
        self.copied = (key, stop)
        return logits

    def _chunk(self, tokens: torch.Tensor, start: int, table: torch.Tensor, stop: int) -> torch.Tensor:
        if self.compiled is not None and 2 <= tokens.shape[1] <= self.size:
            self.start.fill_(start)
            self.table.zero_()  # the scratch block past the sequence's own
            self.table[:, : table.shape[1]] = table
            try:
                with TRACE_CONFIG:  # dynamo's settings for tracing a decode step (decode_step.py)
                    return self.compiled(tokens, stop)
            except Exception as e:  # the eager forward below writes the same positions again
                log.warning("the compiled prefill chunk failed (%s: %s); reading prompts eagerly from now on",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.compiled = None
        start_pos = torch.tensor([start], dtype=torch.long, device=tokens.device)
        return self.model(tokens, start_pos, self._view(table, stop), last_only=True)[:, -1]

    def _view(self, table: torch.Tensor, stop: int) -> PagedKVCache:
        """The cache a chunk that ends at `stop` goes through: the pool, and with `size` the copy."""
        cache = self.cache.with_table(table, length=stop)
        return cache if self.copy_k is None else StagedView(cache, self.copy_k, self.copy_v)

    def _forward(self, tokens: torch.Tensor, stop: int) -> torch.Tensor:  # tokens [1, T]
        return self.model(tokens, self.start, self._view(self.table, stop), last_only=True)[:, -1]  # [1, V]

    def warm_up(self) -> None:
        """Compile now rather than at the first long prompt: a chunk of `size` tokens at position 0,
        one past the first block, and one of 2 tokens after them (its own graph: see the module's
        docstring), written into the scratch block (the table is all scratch), which no sequence reads."""
        if self.compiled is not None:
            table = torch.zeros_like(self.table)
            with torch.inference_mode():
                chunks = [(0, self.size), (self.size, self.size), (2 * self.size, 2)]
                for start, n in chunks:
                    if start + n <= self.cache.max_seq_len:
                        self(torch.zeros(1, n, dtype=torch.long, device=table.device), start, table, start + n)
