"""The engine's per-row device state (`mistral.rows.Rows`): a row holds what its request asked for,
and nothing of the request that held it before."""

import dataclasses

import pytest
import torch

from mistral.engine import GenerationParams
from mistral.rows import COPIED_SETTINGS, Rows
from mistral.sampling import BatchFlags, SamplingTensors

V = 64
EVERYTHING = BatchFlags(greedy_only=False, penalties=True, filtering=True, logit_bias=True, constrained=True)
REQUEST = GenerationParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.05, presence_penalty=0.4,
                           frequency_penalty=0.3, repetition_penalty=1.3, seed=12345, min_tokens=3,
                           logit_bias={7: 2.5, 9: -1.0})


def test_every_sampler_setting_comes_from_the_request():
    rows = Rows(3, V, torch.device("cpu"))
    rows.start(1, REQUEST, prompt=[4, 5, 4])
    s = rows.sampling(1, 2, EVERYTHING)
    for name in COPIED_SETTINGS:
        assert getattr(s, name).item() == pytest.approx(getattr(REQUEST, name)), name
    assert s.seed.item() == 12345 and s.step.item() == 0 and s.ban_eos.item()
    assert s.logit_bias[0, 7] == 2.5 and s.logit_bias[0, 9] == -1.0 and s.logit_bias[0].count_nonzero() == 2
    assert s.in_prompt[0].nonzero().flatten().tolist() == [4, 5] and s.counts[0].count_nonzero() == 0
    assert s.token_mask.shape == (1, 2) and (s.token_mask == -1).all()  # no grammar: every token allowed
    # every field of SamplingTensors is one of these: a new setting cannot be left unset by a request
    covered = set(COPIED_SETTINGS) | {"seed", "step", "ban_eos", "logit_bias", "counts", "in_prompt", "token_mask"}
    assert {f.name for f in dataclasses.fields(SamplingTensors)} == covered
    idle = rows.sampling(0, 1, EVERYTHING)  # the neighbour rows keep the idle values
    assert idle.temperature.item() == 0.0 and idle.repetition_penalty.item() == 1.0 and idle.logit_bias.count_nonzero() == 0


def test_a_reused_row_forgets_the_previous_request():
    rows = Rows(2, V, torch.device("cpu"))
    rows.start(0, REQUEST, prompt=[4, 5])
    rows.record(0, 1, torch.tensor([11]), EVERYTHING, fed=True)
    assert rows.counts[0, 11] == 1 and rows.generated[0] == 1 and rows.pos[0] == 3 and rows.tokens[0] == 11
    rows.stop(0)
    rows.record(0, 2, torch.tensor([12, 13]), EVERYTHING, fed=True)  # idle rows are not moved on
    assert rows.tokens.tolist() == [11, 0] and rows.generated.tolist() == [1, 0] and rows.pos.tolist() == [0, 0]
    rows.start(0, GenerationParams(temperature=0.0), prompt=[6])
    s = rows.sampling(0, 1, EVERYTHING)
    assert s.logit_bias.count_nonzero() == 0 and s.counts.count_nonzero() == 0
    assert s.in_prompt[0].nonzero().flatten().tolist() == [6]
    assert s.temperature.item() == 0.0 and s.step.item() == 0 and not s.ban_eos.item() and rows.pos[0] == 1


def test_unseeded_requests_draw_distinct_seeds():
    rows = Rows(4, V, torch.device("cpu"))
    for row in range(4):
        rows.start(row, GenerationParams(), prompt=[1])
    seeds = rows.seed.tolist()
    assert len(set(seeds)) == 4 and all(0 <= s < 2**31 for s in seeds)
