"""A prompt chunk's forward, compiled: how a long prompt is read on the CPU between decode steps.

With `prefill_chunk` C, the engine reads a long prompt C tokens a step between the running rows'
decode steps. Eagerly, a chunk of 16-64 tokens on a small model costs mostly the few hundred ops'
dispatch, not their work: about as much as a compiled decode step, which the rows then wait for
on top of their own. Compiled, a chunk is one call into a few fused loops around the matmuls and
attention.

Every full chunk has the same shape: tokens [1, C] and its sequence's block table padded to the
whole table's width [1, max_seq_len / block_size] with the scratch block (kv_cache.py), both copied
into buffers of fixed shape; only the number of positions attention reads varies (an int, dynamic).
So two compilations (see `warm_up`) serve every chunk of every prompt at every position. A shorter chunk (a prompt's
last, or a whole short prompt) is read eagerly: its logits may differ from a compiled chunk's in the
last bits, as a prompt read after a cached prefix differs from one read whole (README: prefix caching),
but a prompt's chunks are cut the same way whatever else runs, so its numbers never depend on its company.
"""

from __future__ import annotations

import logging

import torch

from .kv_cache import PagedKVCache
from .model import Transformer

log = logging.getLogger("mistral")


class PrefillStep:
    """`step(tokens, start, table, stop)`: tokens [1, T] at positions start.. written through `table`
    ([1, n] blocks of one sequence); the logits of the last one [1, V]. Chunks of `size` tokens go
    through torch.compile, others (and all, after a compiled chunk failed) run eagerly."""

    def __init__(self, model: Transformer, cache: PagedKVCache, size: int | None, compile: bool):
        self.model, self.cache, self.size = model, cache, size
        dev = cache.block_table.device
        self.compiled = None
        if compile and size is not None and size > 1:
            self.tokens = torch.zeros(1, size, dtype=torch.long, device=dev)
            self.start = torch.zeros(1, dtype=torch.long, device=dev)
            self.table = torch.zeros(1, cache.block_table.shape[1], dtype=torch.long, device=dev)
            for t in (self.tokens, self.start, self.table):
                torch._dynamo.mark_static(t)
            self.compiled = torch.compile(self._forward, dynamic=True, fullgraph=True)

    def __call__(self, tokens: torch.Tensor, start: int, table: torch.Tensor, stop: int) -> torch.Tensor:
        if self.compiled is not None and tokens.shape[1] == self.size:
            self.tokens.copy_(tokens)
            self.start.fill_(start)
            self.table.zero_()  # the scratch block past the sequence's own
            self.table[:, : table.shape[1]] = table
            try:
                return self.compiled(stop)
            except Exception as e:  # the eager forward below writes the same positions again
                log.warning("the compiled prefill chunk failed (%s: %s); reading prompts eagerly from now on",
                            type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.compiled = None
        cache = self.cache.with_table(table, length=stop)
        start_pos = torch.tensor([start], dtype=torch.long, device=tokens.device)
        return self.model(tokens, start_pos, cache, last_only=True)[:, -1]

    def _forward(self, stop: int) -> torch.Tensor:
        cache = self.cache.with_table(self.table, length=stop)
        return self.model(self.tokens, self.start, cache, last_only=True)[:, -1]  # [1, V]

    def warm_up(self) -> None:
        """Compile now rather than at the first long prompt: a prompt's first two chunks, written
        into the scratch block (the table is all scratch), which no sequence reads. Two, since dynamo
        specializes a graph whose chunks end within the first block (a table slice of one block) and
        compiles a second one for the chunks after it; the two serve every chunk from then on."""
        if self.compiled is not None:
            with torch.inference_mode():
                for start in (0, self.size) if 2 * self.size <= self.cache.max_seq_len else (0,):
                    self(torch.zeros_like(self.tokens), start, self.table[:, :1], start + self.size)
