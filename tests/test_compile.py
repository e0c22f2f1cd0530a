"""The compiled decode step (`Engine(compile=True)`, the CPU fast path): the same numbers as eager.

Each test compiles for real (inductor, C++ on this CPU), so the shapes are kept to a few: batch 1,
3 (the blocked mat-vec at batch > 1) and 6 (past its 4-row limit, plain `F.linear`).
"""

import copy
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mistral import Mistral
from mistral.args import preset
from mistral.engine import Engine
from mistral.loader import load_model
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

SEQ = 128  # one model length everywhere: the rotary tables' size is part of what a compilation assumes
MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_random(tmp_path_factory.mktemp("compile") / "w", preset("small"), "consolidated", "float32", seed=7)


def prefilled(model, prompts: list[list[int]], max_seq_len: int = SEQ):
    """A cache holding each prompt in its own row (eager prefill), and each row's next position."""
    cache = model.new_cache(len(prompts), max_seq_len)
    for row, prompt in enumerate(prompts):
        model(torch.tensor([prompt]), torch.zeros(1, dtype=torch.long), cache.view(row, row + 1, length=len(prompt)))
    return cache, torch.tensor([len(p) for p in prompts])


def decode_both_ways(model, prompts, steps: int = 5):
    """Decode `steps` greedy tokens twice from the same prefilled caches, eagerly and compiled;
    return the logits of each step, [steps, B, V] twice, and both caches."""
    compiled = Engine(model, max_batch=len(prompts), max_seq_len=SEQ, compile=True).decode_forward
    out = {"eager": [], "compiled": []}
    with torch.inference_mode():  # as the engine runs it
        eager_cache, pos = prefilled(model, prompts)
        compiled_cache = copy.deepcopy(eager_cache)
        tokens = torch.tensor([[p[-1]] for p in prompts])
        for step in range(steps):
            length = int(pos.max()) + 1  # the engine's exact CPU length
            for name, forward, cache in (("eager", model, eager_cache), ("compiled", compiled, compiled_cache)):
                out[name].append(forward(tokens, pos, cache.view(length=length))[:, -1])
            tokens = out["eager"][-1].argmax(-1, keepdim=True)
            pos = pos + 1
    return torch.stack(out["eager"]), torch.stack(out["compiled"]), eager_cache, compiled_cache


@pytest.mark.parametrize("rows", [1, 3, 6])
def test_compiled_decode_equals_eager_fp32(weights, rows):
    model = load_model(weights, dtype=torch.float32, max_seq_len=SEQ, quiet=True)
    prompts = [[1, 3, 100 + 7 * r, 200 + r, 5][: 2 + r % 4] for r in range(rows)]  # ragged lengths
    eager, compiled, eager_cache, compiled_cache = decode_both_ways(model, prompts)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert torch.equal(compiled.argmax(-1), eager.argmax(-1))
    for k_e, k_c in zip(eager_cache.k + eager_cache.v, compiled_cache.k + compiled_cache.v):
        torch.testing.assert_close(k_c, k_e, rtol=1e-5, atol=1e-5)  # the compiled step wrote the same K, V


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
    assert llm.engine.decode_forward is not llm.model and llm.engine.steps == 11  # compiled decode steps ran


def test_compile_refuses_what_it_cannot_do(weights):
    model = load_model(weights, dtype=torch.float32, max_seq_len=SEQ, quiet=True)
    with pytest.raises(ValueError, match="compile=True and cuda_graphs=True"):
        Engine(model, compile=True, cuda_graphs=True)
    model.use_kernels("triton")
    with pytest.raises(ValueError, match="kernels='triton'"):
        Engine(model, compile=True)


def test_a_failing_compiled_step_falls_back_to_eager(weights, caplog):
    kwargs = dict(device="cpu", kernels="torch", max_batch=1, max_seq_len=SEQ, quiet=True)
    eager = Mistral.from_pretrained(weights, **kwargs).create_chat_completion(MESSAGES, max_tokens=6, temperature=0)
    llm = Mistral.from_pretrained(weights, compile=True, **kwargs)

    def no_compiler(*args):  # what a machine without a C++ compiler would raise, on the first decode step
        raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")

    llm.engine.decode_forward = no_compiler
    completion = llm.create_chat_completion(MESSAGES, max_tokens=6, temperature=0)
    assert completion["choices"][0]["message"] == eager["choices"][0]["message"]
    assert llm.engine.decode_forward is llm.model
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
    llm.warm_up()
    assert llm.engine.steps == 3 and not llm.engine.has_work() and llm.engine.decode_forward is not llm.model
    llm.start()
    try:
        with pytest.raises(RuntimeError, match="before start"):
            llm.warm_up()
    finally:
        llm.stop()
    fixed = Engine(llm.model, max_batch=6, max_seq_len=SEQ, fixed_batch_shape=True)
    assert fixed.warm_up_batches() == [6] and Engine(llm.model, max_batch=9).warm_up_batches() == [1, 2, 5]
