"""The engine's rows on the device: everything a decode step reads besides the weights and the cache.

Each of the engine's `count` rows holds one sequence while it decodes: its last token (the next
step's input), the cache position that token goes to, whether the row is busy, and its sampling
settings. `Rows` keeps all of them as [count] tensors (and [count, V] tables for the settings that
are per token), sets a row from a request's `GenerationParams`, and hands a step rows lo..hi-1 as
views: `sampling()` in the shape the sampler reads (`SamplingTensors`), `record()` to move them on.

The tensors are allocated once and never change shape or address: a CUDA graph reads them where it
recorded them (cuda_graphs.py), and torch.compile is told their shapes are static, which spares
every compiled step their shape guards (decode_step.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import torch

from .sampling import BatchFlags, SamplingTensors, mask_words

if TYPE_CHECKING:
    from .engine import GenerationParams

# The settings a request's row takes from its GenerationParams as they are: each is the field of
# that name in both GenerationParams and SamplingTensors, with its dtype and the value of a row that
# no request has set (an idle row samples greedily, unpenalised).
COPIED_SETTINGS: dict[str, tuple[torch.dtype, float]] = {
    "temperature": (torch.float32, 0.0),
    "top_k": (torch.int64, 0),
    "top_p": (torch.float32, 1.0),
    "min_p": (torch.float32, 0.0),
    "presence_penalty": (torch.float32, 0.0),
    "frequency_penalty": (torch.float32, 0.0),
    "repetition_penalty": (torch.float32, 1.0),
}


class Rows:
    def __init__(self, count: int, vocab_size: int, device: torch.device):
        self.count, self.vocab_size, self.device = count, vocab_size, device
        long = dict(dtype=torch.long, device=device)
        self.tokens = torch.zeros(count, **long)  # [R] the last token of each row
        self.pos = torch.zeros(count, **long)  # [R] where that token goes in the cache
        self.active = torch.zeros(count, **long)  # [R] 1 for busy rows: a step moves only those on
        self.generated = torch.zeros(count, **long)  # [R] tokens sampled so far: the noise counter
        self.min_tokens = torch.zeros(count, **long)  # [R] EOS is banned while generated < min_tokens
        self.seed = torch.zeros(count, **long)  # [R]
        self.settings = {name: torch.full((count,), idle, dtype=dtype, device=device)
                         for name, (dtype, idle) in COPIED_SETTINGS.items()}  # each [R]
        # [R, V] tables, allocated when a request first needs one
        self.logit_bias: torch.Tensor | None = None  # float
        self.counts: torch.Tensor | None = None  # int32: how often each token was generated (penalties)
        self.in_prompt: torch.Tensor | None = None  # bool: the prompt's tokens (repetition penalty)
        # The grammars' token masks ([R, V/32] int32 bits, 4 KB a row): filled on the host, copied
        # to the device for each step with a constrained row (rows without a grammar allow all).
        words = mask_words(vocab_size)
        self.token_mask = torch.full((count, words), -1, dtype=torch.int32, device=device)
        self._host_mask = torch.full((count, words), -1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._seed_source = torch.Generator().manual_seed(torch.initial_seed() & 0xFFFFFFFF)
        for t in (self.tokens, self.pos, self.active, self.generated, self.min_tokens, self.seed,
                  *self.settings.values(), self.token_mask):
            torch._dynamo.mark_static(t)

    def start(self, row: int, params: GenerationParams, prompt: list[int]) -> None:
        """Row `row` takes a sequence whose prompt is in the cache: its settings from `params`, its
        next position after the prompt. A request without a seed gets one drawn here, so that its
        draws, like a seeded request's, never depend on the rows beside it."""
        for name in COPIED_SETTINGS:
            self.settings[name][row] = getattr(params, name)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**31 - 1, (), generator=self._seed_source))
        self.seed[row] = seed & 0x7FFFFFFF
        self.generated[row] = 0
        self.min_tokens[row] = params.min_tokens
        self.pos[row] = len(prompt)
        self.active[row] = 1
        if params.logit_bias and self.logit_bias is None:
            self.logit_bias = self._table(torch.float32)
        if self.logit_bias is not None:
            self.logit_bias[row] = 0
            if params.logit_bias:
                ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=self.device)
                values = torch.tensor(list(params.logit_bias.values()), dtype=torch.float32, device=self.device)
                self.logit_bias[row, ids] = values
        if params.uses_penalties and self.counts is None:
            self.counts, self.in_prompt = self._table(torch.int32), self._table(torch.bool)
        if self.counts is not None:
            self.counts[row] = 0
            self.in_prompt[row] = False
            self.in_prompt[row, torch.tensor(prompt, dtype=torch.long, device=self.device)] = True

    def stop(self, row: int) -> None:
        """The row is idle: its steps feed position 0 (the cache's scratch block) and move nothing on."""
        self.active[row] = 0
        self.pos[row] = 0

    def sampling(self, lo: int, hi: int, flags: BatchFlags) -> SamplingTensors:
        """The settings of rows lo..hi-1; the per-token tables only for a batch that uses them (what a
        compiled step does not read, it does not guard on either)."""
        generated = self.generated[lo:hi]
        return SamplingTensors(
            **{name: t[lo:hi] for name, t in self.settings.items()},
            seed=self.seed[lo:hi], step=generated, ban_eos=generated < self.min_tokens[lo:hi],
            logit_bias=self.logit_bias[lo:hi] if flags.logit_bias else None,
            counts=self.counts[lo:hi] if flags.penalties else None,
            in_prompt=self.in_prompt[lo:hi] if flags.penalties else None,
            token_mask=self.token_mask[lo:hi] if flags.constrained else None,
        )

    def record(self, lo: int, hi: int, next_tokens: torch.Tensor, flags: BatchFlags, fed: bool) -> None:
        """Busy rows lo..hi-1 after a token was sampled for each: it is their next input, one more
        generated, and counted for penalties. `fed`: a decode step put the previous tokens in the
        cache, so the new ones go in at the next position (after a prefill, `pos` already points
        past the prompt)."""
        active = self.active[lo:hi]
        if fed:
            self.pos[lo:hi] += active
        self.tokens[lo:hi] = torch.where(active.bool(), next_tokens, self.tokens[lo:hi])
        self.generated[lo:hi] += active
        if flags.penalties:  # the only rows that read their counts; each is in every batch of its life
            self.counts[lo:hi].scatter_add_(1, next_tokens[:, None], active[:, None].int())

    def moved_by_step(self, batch: int, flags: BatchFlags) -> list[torch.Tensor]:
        """What `record` changes in rows 0..batch-1."""
        moved = [self.tokens[:batch], self.pos[:batch], self.generated[:batch]]
        return moved + [self.counts[:batch]] if flags.penalties else moved

    def fill_token_masks(self, lo: int, hi: int, matchers: Iterable[tuple[int, Any]]) -> None:
        """Rows lo..hi-1 of the token mask: each (row, structured.Matcher) given fills its own row (on
        the host, ~30-100 µs a row), every other row allows all; then one copy to the device."""
        host = self._host_mask[lo:hi]
        host.fill_(-1)
        for row, matcher in matchers:
            matcher.fill(self._host_mask[row])
        self.token_mask[lo:hi].copy_(host, non_blocking=True)

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        table = torch.zeros(self.count, self.vocab_size, dtype=dtype, device=self.device)
        torch._dynamo.mark_static(table)
        return table
