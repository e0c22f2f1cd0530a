"""Choosing the next token, on the device, for a batch of rows that each have their own settings.

Per row: logit_bias, presence / frequency / repetition penalties, temperature (0 = greedy), top-k,
top-p, min-p, a banned EOS (min_tokens), a grammar's token mask (structured.py), and a seed. Everything is tensor arithmetic over [B, V]:
no loop over rows, no host synchronisation.

Randomness is counter-based: the noise for (seed, step, token) is a hash of those three numbers.
A seeded request therefore draws the same tokens whether it runs alone or beside others in a batch,
and no generator state has to be carried between steps. Sampling is Gumbel-max: the argmax of
logits / T + Gumbel noise is an exact draw from softmax(logits / T).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2³² for int64 x in [0, 2³²): with c < 2³¹ the product fits in int64."""
    return (x * c) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply; constants from Wellons' hash prospector, both
    below 2³¹ so that two int64 ops do each multiply): every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


def _token_hashes(vocab_size: int, device: torch.device) -> torch.Tensor:
    """[V] int64: each token id's own hash, the same at every step."""
    return _mix32(torch.arange(vocab_size, device=device, dtype=torch.int64) * 0x85EBCA6B & _M32)


_cached_token_hashes = functools.lru_cache(maxsize=8)(_token_hashes)  # eager: made once per device


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u in (0, 1), [B, V] fp32: a deterministic function of (seed[b], step[b], token)."""
    row = _mix32((seed & _M32) ^ _mix32((step * 0x9E3779B9) & _M32))  # [B]
    # [V]; under torch.compile recomputed inside the fused loop, which costs less than reading it
    col = (_token_hashes if torch.compiler.is_compiling() else _cached_token_hashes)(vocab_size, seed.device)
    bits = _mix32(row[:, None] ^ col[None, :]) >> 8  # [B, V], 24 random bits
    # The top value, 1 - 2⁻²⁵, rounds to 1.0 in fp32, whose Gumbel noise is +inf: added to a refused
    # token's -inf it made NaN, which argmax picks (a top-k/top-p/grammar-refused token about once
    # in 512 steps at V = 32768). Clamped to the largest fp32 below 1, every other draw unchanged.
    return ((bits.float() + 0.5) * (1.0 / (1 << 24))).clamp_max(1.0 - 2.0**-24)


@dataclass
class SamplingTensors:
    """Per-row settings of the rows being sampled, each [B] on the device (or [B, V] where noted)."""

    temperature: torch.Tensor  # float; 0 means greedy
    top_k: torch.Tensor  # int64; 0 means no limit
    top_p: torch.Tensor  # float in (0, 1]
    min_p: torch.Tensor  # float in [0, 1]
    presence_penalty: torch.Tensor  # float
    frequency_penalty: torch.Tensor  # float
    repetition_penalty: torch.Tensor  # float; 1 means none
    seed: torch.Tensor  # int64
    step: torch.Tensor  # int64: tokens generated so far (the noise counter)
    ban_eos: torch.Tensor  # bool
    logit_bias: torch.Tensor | None = None  # [B, V] float, or None when no row has one (read with flags.logit_bias)
    counts: torch.Tensor | None = None  # [B, V] int32: how often each token was generated (penalties)
    in_prompt: torch.Tensor | None = None  # [B, V] bool: tokens of the prompt (repetition penalty)
    token_mask: torch.Tensor | None = None  # [B, mask_words(V)] int32 bits: the tokens a grammar allows


@dataclass(frozen=True)
class BatchFlags:
    """What the rows of this batch use, known on the host, so unused work is skipped."""

    greedy_only: bool = True
    penalties: bool = False
    filtering: bool = False  # any top-k / top-p / min-p
    logit_bias: bool = False
    constrained: bool = False  # some row's grammar limits its next token (token_mask)

    @classmethod
    def of(cls, params: Iterable, constrained: bool = False) -> BatchFlags:
        """The flags of a batch whose rows ask for `params` (their engine.GenerationParams);
        constrained: whether some row's grammar is active, which the engine knows."""
        params = list(params)
        return cls(
            greedy_only=all(p.temperature == 0 for p in params),
            penalties=any(p.uses_penalties for p in params),
            filtering=any(p.uses_filtering and p.temperature > 0 for p in params),
            logit_bias=any(p.logit_bias for p in params),
            constrained=constrained,
        )


def mask_words(vocab_size: int) -> int:
    """int32 words in one row of a token bitmask: bit t % 32 of word t // 32 allows token t."""
    return (vocab_size + 31) // 32


def allowed_tokens(token_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 bitmask -> [B, V] bool. A row of all ones (-1) allows every token."""
    bits = torch.arange(32, dtype=torch.int32, device=token_mask.device)
    return ((token_mask[:, :, None] >> bits) & 1).flatten(1)[:, :vocab_size].bool()


def apply_penalties(logits: torch.Tensor, s: SamplingTensors) -> torch.Tensor:
    """OpenAI's presence/frequency penalties on generated tokens, and the multiplicative
    repetition penalty (as in CTRL / transformers) on prompt and generated tokens."""
    counts = s.counts.to(logits.dtype)
    logits = logits - s.frequency_penalty[:, None] * counts - s.presence_penalty[:, None] * (counts > 0)
    seen = (s.counts > 0) | s.in_prompt
    rep = s.repetition_penalty[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    return torch.where(seen, penalised, logits)


def filter_logits(logits: torch.Tensor, s: SamplingTensors) -> torch.Tensor:
    """Set to -inf every token outside top-k, outside the top-p nucleus, or below min_p · p_max.
    logits are already divided by the temperature."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
    V = logits.shape[-1]
    rank = torch.arange(V, device=logits.device)
    k = torch.where(s.top_k > 0, s.top_k, V)
    drop = rank[None, :] >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # probability mass ranked above each token
    drop |= before >= s.top_p[:, None]  # the top token is always kept: its `before` is 0
    drop |= probs < s.min_p[:, None] * probs[:, :1]
    drop_unsorted = torch.zeros_like(drop).scatter(-1, order, drop)
    return logits.masked_fill(drop_unsorted, float("-inf"))


def sample(logits: torch.Tensor, s: SamplingTensors, flags: BatchFlags, eos_id: int) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> next tokens [B] int64."""
    logits = logits.to(torch.float32, copy=True)  # one copy, edited in place below; the caller's stay as they were
    if flags.logit_bias:
        logits = logits + s.logit_bias
    if flags.penalties:
        logits = apply_penalties(logits, s)
    logits[:, eos_id] = torch.where(s.ban_eos, float("-inf"), logits[:, eos_id])
    if flags.constrained:  # after every other change: nothing may bring back a token the grammar refused
        logits = logits.masked_fill(~allowed_tokens(s.token_mask, logits.shape[-1]), float("-inf"))
    greedy = logits.argmax(-1)
    if flags.greedy_only:
        return greedy
    temperature = s.temperature.clamp_min(1e-5)[:, None]
    scaled = logits / temperature
    if flags.filtering:
        scaled = filter_logits(scaled, s)
    gumbel = -torch.log(-torch.log(uniform_noise(s.seed, s.step, logits.shape[-1])))
    sampled = (scaled + gumbel).argmax(-1)
    return torch.where(s.temperature == 0, greedy, sampled)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int):
    """log p(token) of the chosen tokens [B], and the `top` most likely (logprobs, ids) [B, top],
    from the model's own distribution (before temperature, penalties and filtering)."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, tokens[:, None])[:, 0]
    if top > 0:
        top_logp, top_ids = logp.topk(top, dim=-1)
        return chosen, top_logp, top_ids
    return chosen, None, None
