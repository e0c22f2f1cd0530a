"""The compiled decode step (`Engine(compile=True)`, the CPU fast path): the same numbers as eager.

Each test compiles for real (inductor, C++ on this CPU), so the shapes are kept to a few: batch 1,
3 (the blocked mat-vec at batch > 1) and 6 (past its 4-row limit, plain `F.linear`).
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from mistral import Mistral
from mistral.args import preset
from mistral.decode_step import DecodeStep
from mistral.engine import Engine, GenerationParams
from mistral.errors import RequestError
from mistral.loader import load_model
from mistral.ops import get_ops
from mistral.make_random import make_random

def _cpu_compile_works() -> str | None:
    """Why torch.compile cannot build CPU code here (no C++ compiler, no Python headers), or None."""
    if not any(shutil.which(cc) for cc in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "no C++ compiler"
    try:
        torch.compile(lambda x: x * 2 + 1, dynamic=False)(torch.ones(8))
    except Exception as e:  # an environment problem: nothing of ours is compiled here
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


_why_not = _cpu_compile_works()
if _why_not is not None:
    pytest.skip(f"torch.compile cannot build CPU code on this machine ({_why_not})", allow_module_level=True)

def compiled_graphs() -> int:
    """How many graphs of the engine's decode step dynamo holds in this process (both step functions;
    engines of the same shapes share them): more than none shows compiled code, not eager, ran."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    steps = (DecodeStep.advance, DecodeStep.advance_filtering)
    return sum(len(_debug_get_cache_entry_list(step.__code__)) for step in steps)


SEQ = 128  # one model length everywhere: the rotary tables' size is part of what a compilation assumes
MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_random(tmp_path_factory.mktemp("compile") / "w", preset("small"), "consolidated", "float32", seed=7)


def decode_both_ways(model, prompts: list[list[int]], steps: int = 5):
    """Greedy-decode `steps` tokens after each prompt (one row each, ragged lengths) with two engines on
    the same model, eager and compiled (prefill is eager in both); return the logits of each decode
    step, [steps, B, V] twice, and both engines (their caches hold what the steps wrote)."""
    logits, engines, decode_steps = {}, {}, {}
    for name in ("eager", "compiled"):
        engine = engines[name] = Engine(model, max_batch=len(prompts), max_seq_len=SEQ, compile=name == "compiled")
        seen = logits[name] = []
        step = decode_steps[name] = engine.decode_step

        def keep_logits(*args, step=step, seen=seen):  # the real step, its logits kept on the side
            out = step(*args)
            seen.append(out[0].clone())
            return out

        engine.decode_step = keep_logits
        for prompt in prompts:
            engine.add(prompt, GenerationParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True), lambda event: None)
        engine.run_until_idle()
        assert len(seen) == steps
    assert decode_steps["compiled"].compiled is not None and compiled_graphs() > 0  # compiled throughout
    return torch.stack(logits["eager"]), torch.stack(logits["compiled"]), engines["eager"], engines["compiled"]


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_compiled_decode_equals_eager_fp32(weights, rows):
    model = load_model(weights, dtype=torch.float32, max_seq_len=SEQ, quiet=True)
    prompts = [[1, 3, 100 + 7 * r, 200 + r, 5][: 2 + r % 4] for r in range(rows)]  # ragged lengths
    eager, compiled, eager_engine, compiled_engine = decode_both_ways(model, prompts)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    for name in ("k", "v"):  # the compiled steps wrote the same keys and values at the same positions
        for expected, actual in zip(getattr(eager_engine.cache, name), getattr(compiled_engine.cache, name)):
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for name in ("tokens", "generated"):  # and moved each row's state on alike
        assert torch.equal(getattr(compiled_engine.rows, name), getattr(eager_engine.rows, name)), name


def test_compiled_bf16_decode_is_as_close_to_fp32_as_eager_bf16(weights):
    reference = load_model(weights, dtype=torch.float32, max_seq_len=SEQ, quiet=True)
    model = load_model(weights, dtype=torch.bfloat16, max_seq_len=SEQ, quiet=True)
    prompts = [[1, 3, 1000, 4]]
    exact, _, _, _ = decode_both_ways(reference, prompts, steps=3)
    eager, compiled, _, _ = decode_both_ways(model, prompts, steps=3)
    eager_error = (eager.float() - exact).abs().max()
    compiled_error = (compiled.float() - exact).abs().max()
    assert eager_error > 0  # bf16 does round
    assert compiled_error <= 2 * eager_error, (compiled_error, eager_error)


def test_compiled_chat_completion_equals_eager(weights):
    kwargs = dict(device="cpu", kernels="torch", max_batch=1, max_seq_len=SEQ, quiet=True)
    eager = Mistral.from_pretrained(weights, **kwargs).create_chat_completion(MESSAGES, max_tokens=12, temperature=0)
    llm = Mistral.from_pretrained(weights, compile=True, **kwargs)
    compiled = llm.create_chat_completion(MESSAGES, max_tokens=12, temperature=0)
    assert compiled["choices"][0]["message"] == eager["choices"][0]["message"]
    assert compiled["usage"] == eager["usage"]
    assert llm.engine.decode_step.compiled is not None and llm.engine.steps == 11  # compiled decode steps ran
    assert compiled_graphs() > 0


@pytest.mark.parametrize("n, filtering", [(2, {"top_k": 40, "top_p": 0.9, "min_p": 0.01}), (5, {})])
def test_compiled_sampling_draws_what_eager_draws(weights, n, filtering):
    """The sampler runs inside the compiled step: seeded draws with penalties, logit_bias and n choices,
    with top-k/top-p/min-p (their own compiled function) or without (5 rows: the largest batch
    class), pick the same tokens as eager sampling."""
    kwargs = dict(device="cpu", kernels="torch", max_batch=n, max_seq_len=SEQ, quiet=True)
    params = dict(max_tokens=10, temperature=1.3, frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2,
                  logit_bias={"1000": 5.0, "2000": -100}, seed=11, n=n, **filtering)
    eager = Mistral.from_pretrained(weights, **kwargs).create_completion("Rivers:", **params)
    llm = Mistral.from_pretrained(weights, compile=True, **kwargs)
    compiled = llm.create_completion("Rivers:", **params)
    assert [c["text"] for c in compiled["choices"]] == [c["text"] for c in eager["choices"]]
    assert len({c["text"] for c in compiled["choices"]}) == n  # n draws, not one n times
    assert llm.engine.decode_step.compiled is not None and llm.engine.steps == 9 and compiled_graphs() > 0


def test_compile_refuses_what_it_cannot_do(weights):
    model = load_model(weights, dtype=torch.float32, max_seq_len=SEQ, quiet=True)
    with pytest.raises(ValueError, match="compile=True and cuda_graphs=True"):
        Engine(model, compile=True, cuda_graphs=True)
    model.use_ops(get_ops("triton"))
    with pytest.raises(ValueError, match="kernels='triton'"):
        Engine(model, compile=True)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_failing_compiled_step_falls_back_to_eager(weights, caplog, when):
    """A compiled step that raises, before running (no C++ compiler) or after moving the rows' state
    on (a kernel failing halfway), leaves the completion exactly as eager decoding makes it."""
    kwargs = dict(device="cpu", kernels="torch", max_batch=1, max_seq_len=SEQ, quiet=True)
    params = dict(max_tokens=6, temperature=0.8, seed=5, frequency_penalty=0.5)
    reference = Mistral.from_pretrained(weights, **kwargs)
    eager = reference.create_chat_completion(MESSAGES, **params)
    llm = Mistral.from_pretrained(weights, compile=True, **kwargs)
    step = llm.engine.decode_step

    def failing(*args):  # what a machine without a C++ compiler raises on the first decode step
        if when == "after":
            step.advance(*args)  # tokens, positions, counts moved on, then:
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    step.compiled = failing
    completion = llm.create_chat_completion(MESSAGES, **params)
    assert completion["choices"][0]["message"] == eager["choices"][0]["message"]
    for name in ("tokens", "generated", "counts"):  # each generated token recorded once, penalties' counts too
        assert torch.equal(getattr(llm.engine.rows, name), getattr(reference.engine.rows, name)), name
    assert step.compiled is None
    assert "decoding eagerly from now on" in caplog.text and "InvalidCxxCompiler" in caplog.text


def test_cli_generate_with_compile_prints_what_eager_prints(weights):
    def generate(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mistral.cli", "generate", str(weights), "--device", "cpu",
                               "--max-seq-len", str(SEQ), "--prompt", "Name a river.", "--max-tokens", "8",
                               "--temperature", "0", *flags], capture_output=True, text=True, timeout=300)

    eager, compiled = generate(), generate("--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    assert eager.stdout.strip() and compiled.stdout == eager.stdout
    assert "compiling the decode step" in compiled.stderr and "decoding eagerly" not in compiled.stderr


def test_warm_up_decodes_at_each_batch_size_that_compiles_apart(weights):
    llm = Mistral.from_pretrained(weights, device="cpu", kernels="torch", max_batch=3, max_seq_len=SEQ, quiet=True,
                                  compile=True)
    assert llm.engine.warm_up_batches() == [1, 2, 3]
    llm.warm_up()  # greedy and sampled, at each of the three batch sizes: two decode steps each
    assert llm.engine.steps == 12 and not llm.engine.has_work() and llm.engine.decode_step.compiled is not None
    llm.warm_up({"temperature": 0.7, "top_p": 0.9})
    assert llm.engine.steps == 18 and llm.engine.decode_step.compiled is not None
    prepared = compiled_graphs()
    # warmed-up settings compile nothing more, at any length: 40 tokens run past the first cache
    # block, whose length the first compiled graph is specialized to
    for n, temperature in ((1, 0.0), (2, 1.0), (3, 0.7)):
        llm.create_completion("Rivers:", max_tokens=40, n=n, temperature=temperature, top_p=0.9 if temperature == 0.7 else 1.0)
    assert compiled_graphs() == prepared > 0
    with pytest.raises(RequestError, match="top_p"):
        llm.warm_up({"top_p": 2})
    llm.start()
    try:
        with pytest.raises(RuntimeError, match="before start"):
            llm.warm_up()
    finally:
        llm.stop()
    fixed = Engine(llm.model, max_batch=6, max_seq_len=SEQ, fixed_batch_shape=True)
    assert fixed.warm_up_batches() == [6] and Engine(llm.model, max_batch=9).warm_up_batches() == [1, 2, 5]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_compiled_quantized_decode_equals_eager(weights, quantize):
    """The quantized layers' compiled form (a reduction over the integer weights) against their
    eager one (PyTorch's packed int8 mat-mul; int4 dequantized then F.linear), in the engine."""
    model = load_model(weights, dtype=torch.float32, max_seq_len=SEQ, quiet=True, quantize=quantize)
    eager, compiled, _, _ = decode_both_ways(model, [[1, 3, 100, 200], [1, 7]])
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
