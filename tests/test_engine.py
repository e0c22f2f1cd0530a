"""The engine's scheduling under cancellation and failure, on a tiny random model.

The oracle for each surviving sequence is the same sequence decoded alone on a fresh engine: with
`fixed_batch_shape=True` a row's greedy tokens never depend on its neighbours, so a cancellation or a
failing neighbour must leave them exactly as they were.
"""

import pytest

from mistral.args import ModelArgs
from mistral.engine import Engine, FinishEvent, GenerationParams, TokenEvent
from mistral.loader import load_model
from mistral.make_random import make_random

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96,
                 norm_eps=1e-5, vocab_size=512, rope_theta=1e6)
GREEDY = GenerationParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_random(tmp_path_factory.mktemp("engine"), ARGS, "consolidated", "float32", seed=3, tokenizer=False)
    return load_model(folder, device="cpu", kernels="torch", max_seq_len=64, quiet=True)


class Recorder:
    """Each sequence's events, in order."""

    def __init__(self, engine: Engine):
        self.engine, self.events = engine, {}

    def add(self, prompt: list[int], params: GenerationParams = GREEDY):
        seq = self.engine.add(prompt, params, lambda ev, k=len(self.events): self.events[k].append(ev))
        self.events[len(self.events)] = []
        return seq

    def tokens(self, k: int) -> list[int]:
        return [e.token for e in self.events[k] if isinstance(e, TokenEvent)]

    def finish(self, k: int) -> FinishEvent:
        finishes = [e for e in self.events[k] if isinstance(e, FinishEvent)]
        assert len(finishes) == 1, f"sequence {k} got {len(finishes)} finish events: {self.events[k]}"
        return finishes[0]


def prompts(count: int) -> list[list[int]]:
    return [[1, 10 + k, 20 + 3 * k, 7] for k in range(count)]


def alone(model, prompt: list[int]) -> list[int]:
    rec = Recorder(Engine(model, max_batch=2, fixed_batch_shape=True))
    rec.add(prompt)
    rec.engine.run_until_idle()
    return rec.tokens(0)


def assert_idle(engine: Engine) -> None:
    stats = engine.debug_state()
    assert (stats["running"], stats["waiting"], stats["free_rows"]) == (0, 0, engine.max_batch), stats


def test_a_cancellation_with_more_waiting_than_free_rows_admits_only_what_fits(model):
    """The defect: with a cancellation pending, the admission loop took the whole queue, the prefill
    popped from an empty free list, and every sequence finished with an error."""
    engine = Engine(model, max_batch=2, fixed_batch_shape=True)
    rec = Recorder(engine)
    seqs = [rec.add(p) for p in prompts(6)]
    engine.step()  # 0 and 1 run, 2-5 wait
    assert sorted(s.id for s in engine.running.values()) == [seqs[0].id, seqs[1].id]
    engine.cancel(seqs[0])
    engine.step()  # 0's row is free again: exactly one more admitted
    assert len(engine.running) == 2 and len(engine.waiting) == 3
    engine.cancel(seqs[3])  # still waiting: it never takes a row
    engine.cancel(seqs[1])
    engine.run_until_idle()
    assert_idle(engine)
    for k in range(6):
        expected = "cancelled" if k in (0, 1, 3) else "length"
        assert rec.finish(k).reason == expected, (k, rec.events[k][-1])
    assert rec.tokens(3) == []
    for k in (2, 4, 5):
        assert rec.tokens(k) == alone(model, prompts(6)[k])


def test_many_cancellations_in_one_step_fill_every_freed_row(model):
    engine = Engine(model, max_batch=3, fixed_batch_shape=True)
    rec = Recorder(engine)
    seqs = [rec.add(p) for p in prompts(8)]
    engine.step()
    for seq in seqs[:3] + seqs[5:7]:  # every running row and two that wait
        engine.cancel(seq)
    engine.step()
    assert sorted(s.id for s in engine.running.values()) == [seqs[3].id, seqs[4].id, seqs[7].id]
    engine.run_until_idle()
    assert_idle(engine)
    assert [rec.finish(k).reason for k in range(8)] == ["cancelled"] * 3 + ["length"] * 2 + ["cancelled"] * 2 + ["length"]


def test_a_failing_prefill_fails_that_sequence_only(model):
    """A prompt the model cannot embed (an id past the vocabulary: the layers above check ids, the
    engine does not) raises inside the prefill; its neighbours, running or admitted in the same step,
    carry on untouched."""
    engine = Engine(model, max_batch=3, fixed_batch_shape=True)
    rec = Recorder(engine)
    rec.add(prompts(1)[0])
    engine.step()
    rec.add([1, ARGS.vocab_size + 5])
    rec.add(prompts(3)[2])
    engine.run_until_idle()
    assert_idle(engine)
    assert rec.finish(1).reason == "error" and "Index" in rec.finish(1).message
    assert rec.tokens(1) == []
    assert rec.finish(0).reason == rec.finish(2).reason == "length"
    assert rec.tokens(0) == alone(model, prompts(1)[0])
    assert rec.tokens(2) == alone(model, prompts(3)[2])


def test_a_model_that_cannot_be_captured_decodes_without_cuda_graphs(model):
    """Tensor parallelism's leader announces every model call from the host (capturable = False):
    asking for CUDA graphs is refused with a reason, and by default none are made."""

    class HostDriven:
        capturable = False

        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, *args, **kwargs):
            return model(*args, **kwargs)

    with pytest.raises(ValueError, match="cannot be captured in a CUDA graph"):
        Engine(HostDriven(), max_batch=2, cuda_graphs=True)
    engine = Engine(HostDriven(), max_batch=2, fixed_batch_shape=True)
    assert engine.decode_step.graphs is None
    rec = Recorder(engine)
    rec.add(prompts(1)[0])
    engine.run_until_idle()
    assert rec.tokens(0) == alone(model, prompts(1)[0])
