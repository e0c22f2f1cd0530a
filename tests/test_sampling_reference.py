"""The sampler against references that share none of its code: transformers' logits processors
(top-k, top-p, min-p, repetition penalty, temperature) and OpenAI's published formula for the
presence and frequency penalties, written out per token in plain Python.

Random logits have no ties, so the kept sets are unambiguous; a row of settings per row of the
batch checks that each row reads its own settings."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mistral.sampling import BatchFlags, SamplingTensors, apply_penalties, filter_logits, sample

V = 64
EOS = 2


def settings(B: int, **per_row) -> SamplingTensors:
    """SamplingTensors for B rows: neutral defaults, any field given as a list of B values."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    defaults = dict(temperature=[1.0] * B, top_k=[0] * B, top_p=[1.0] * B, min_p=[0.0] * B,
                    presence_penalty=[0.0] * B, frequency_penalty=[0.0] * B, repetition_penalty=[1.0] * B)
    values = {**defaults, **{k: v for k, v in per_row.items() if k in defaults}}
    return SamplingTensors(
        temperature=f32(values["temperature"]), top_k=torch.tensor(values["top_k"]), top_p=f32(values["top_p"]),
        min_p=f32(values["min_p"]), presence_penalty=f32(values["presence_penalty"]),
        frequency_penalty=f32(values["frequency_penalty"]), repetition_penalty=f32(values["repetition_penalty"]),
        seed=torch.tensor(per_row.get("seed", list(range(B)))), step=torch.zeros(B, dtype=torch.long),
        ban_eos=torch.zeros(B, dtype=torch.bool), counts=per_row.get("counts"), in_prompt=per_row.get("in_prompt"),
    )


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


@pytest.fixture
def logits():
    return torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3


WARPERS = {"top_k": TopKLogitsWarper, "top_p": TopPLogitsWarper, "min_p": MinPLogitsWarper}


@pytest.mark.parametrize("name, value", [("top_k", k) for k in (1, 5, 17, V)] + [("top_p", p) for p in (0.05, 0.3, 0.9, 0.999)]
                         + [("min_p", m) for m in (0.01, 0.1, 0.5, 1.0)])
def test_each_filter_keeps_what_transformers_keeps(logits, name, value):
    ours = filter_logits(logits, settings(4, **{name: [value] * 4}))
    ref = WARPERS[name](value)(None, logits.clone())
    for b in range(4):
        assert kept(ours[b]) == kept(ref[b])
        assert torch.equal(ours[b][torch.isfinite(ours[b])], logits[b][torch.isfinite(ref[b])])  # kept, unchanged


def test_filters_combined_per_row_as_transformers_chains_them(logits):
    """Each row its own top-k, top-p and min-p, after its own temperature; transformers' order
    (temperature, top-k, top-p, min-p) gives the same set, since min-p's ratio to the top
    probability does not depend on which tokens top-p already removed."""
    rows = [(0.7, 10, 0.8, 0.05), (1.3, 0, 0.5, 0.0), (1.0, 3, 1.0, 0.2), (0.4, 40, 0.95, 0.01)]
    temperature, top_k, top_p, min_p = (list(c) for c in zip(*rows))
    s = settings(4, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = filter_logits(logits / s.temperature[:, None], s)
    for b, (t, k, p, m) in enumerate(rows):
        ref = TemperatureLogitsWarper(t)(None, logits[b:b + 1].clone())
        for warper in ([TopKLogitsWarper(k)] if k else []) + [TopPLogitsWarper(p)] + ([MinPLogitsWarper(m)] if m else []):
            ref = warper(None, ref)
        assert kept(ours[b]) == kept(ref[0]), f"row {b}"


def test_repetition_penalty_equals_transformers(logits):
    prompt = [[3, 5, 7], [1, 2], [10, 11, 12, 13], [63]]
    generated = [[5, 9, 9], [], [0], [63, 62]]
    penalty = [1.3, 1.1, 2.0, 0.8]
    counts = torch.zeros(4, V, dtype=torch.int32)
    in_prompt = torch.zeros(4, V, dtype=torch.bool)
    for b in range(4):
        in_prompt[b, prompt[b]] = True
        for t in generated[b]:
            counts[b, t] += 1
    ours = apply_penalties(logits, settings(4, repetition_penalty=penalty, counts=counts, in_prompt=in_prompt))
    for b in range(4):
        ids = torch.tensor([prompt[b] + generated[b]])
        ref = RepetitionPenaltyLogitsProcessor(penalty[b])(ids, logits[b:b + 1].clone())[0]
        torch.testing.assert_close(ours[b], ref, rtol=1e-6, atol=1e-6)


def test_presence_and_frequency_penalties_follow_openais_formula(logits):
    """OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c[j] the count of
    token j in the text generated so far (the prompt does not count)."""
    generated = [[4, 4, 4, 8], [1], [], [60, 61, 60]]
    presence, frequency = [0.5, -1.0, 2.0, 1.5], [0.25, 0.0, 1.0, -0.5]
    counts = torch.zeros(4, V, dtype=torch.int32)
    for b in range(4):
        for t in generated[b]:
            counts[b, t] += 1
    s = settings(4, presence_penalty=presence, frequency_penalty=frequency, counts=counts,
                 in_prompt=torch.ones(4, V, dtype=torch.bool))
    ours = apply_penalties(logits, s)
    for b in range(4):
        for j in range(V):
            c = generated[b].count(j)
            expected = logits[b, j].item() - c * frequency[b] - (c > 0) * presence[b]
            assert math.isclose(ours[b, j].item(), expected, rel_tol=1e-6, abs_tol=1e-6), (b, j)


def test_sampled_tokens_follow_the_filtered_softmax():
    """2,000 seeds of one row: every draw is in the set transformers keeps, and the frequencies
    match softmax(logits / T) renormalised over that set (a chi-square bound far above chance)."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 2
    N, T = 2000, 0.8
    s = settings(N, temperature=[T] * N, top_k=[12] * N, top_p=[0.9] * N, seed=list(range(N)))
    draws = sample(logits.expand(N, V), s, BatchFlags(greedy_only=False, filtering=True), EOS)
    ref = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(12)(None, TemperatureLogitsWarper(T)(None, logits.clone())))
    allowed = kept(ref[0])
    assert set(draws.tolist()) <= allowed
    p = ref[0].softmax(-1)
    observed = torch.bincount(draws, minlength=V).float()
    expected = p * N
    mask = expected > 0
    chi2 = (((observed - expected) ** 2)[mask] / expected[mask]).sum().item()
    dof = int(mask.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # ~6 standard deviations of chi2(dof)


def test_greedy_rows_ignore_filters_and_noise(logits):
    s = settings(4, temperature=[0.0, 1.0, 0.0, 1.0], top_k=[1, 1, 0, 1])
    draws = sample(logits, s, BatchFlags(greedy_only=False, filtering=True), EOS)
    # temperature 0 is greedy, and top_k 1 leaves only the argmax: every row draws its argmax
    assert torch.equal(draws, logits.argmax(-1))
