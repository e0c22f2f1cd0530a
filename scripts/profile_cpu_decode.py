"""Where an int8 / int4 decode step's time goes on the CPU: in the mat-vec kernels or around them.

    python scripts/profile_cpu_decode.py [--size 0.5b] [--quantize int8 int4] [--steps 32] [--threads 2]

For each quantization, on the random checkpoint that scripts/bench_llamacpp.py uses (--cache):
1. step: the eager decode step (one position through `model(...)`), and the compiled one
   (`Engine(compile=True)`), in ms per token;
2. kernels: the step's own mat-vec calls (recorded from one step: the same tensors, in the same
   order) replayed back to back, and each shape's share and GB/s in that replay; what is left of
   the step is everything around the kernels (dispatch, norms, attention, the Python of the layers);
3. fixed cost: one call on a [64, 32] matrix, which reads nothing worth counting;
4. isolated, cold: each shape alone over copies of its matrix that together exceed 8x the L3, so
   that every read comes from main memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import ensure_checkpoints, our_decode  # noqa: E402

import kernels.cpu as cpu_kernels  # noqa: E402
from mistral.bench.timing import best_time, load_average  # noqa: E402
from mistral.engine import Engine  # noqa: E402
from mistral.loader import load_model  # noqa: E402
from mistral.tokenizer import Tokenizer  # noqa: E402


def record_calls(model, steps_at: int) -> list[tuple]:
    """The mat-vec calls of one eager decode step: (name, op, args)."""
    calls = []
    originals = {name: getattr(cpu_kernels, name) for name in ("int8_matvec", "int4_matvec")}

    def recorder(name):
        def call(*args):
            calls.append((name, originals[name], args))
            return originals[name](*args)
        return call

    for name in originals:
        setattr(cpu_kernels, name, recorder(name))
    try:
        cache = model.new_cache(1, steps_at + 2)
        with torch.inference_mode():
            model(torch.tensor([[1]]), torch.tensor([steps_at]), cache)
    finally:
        for name, fn in originals.items():
            setattr(cpu_kernels, name, fn)
    return calls


def shape_of(args) -> tuple[int, int]:
    weight = args[1]
    return weight.shape[0], weight.shape[1] * (2 if weight.dtype == torch.uint8 else 1)


def nbytes(args) -> int:
    return args[1].numel() * args[1].element_size() + args[2].numel() * args[2].element_size()


def eager_step_ms(model, steps: int) -> float:
    cache = model.new_cache(1, steps + 8)
    best = float("inf")
    with torch.inference_mode():
        for pos in range(steps):
            start = time.perf_counter()
            model(torch.tensor([[1 + pos]]), torch.tensor([pos]), cache)
            best = min(best, time.perf_counter() - start) if pos >= 2 else best
    return 1e3 * best


def replay(calls, passes: int = 5) -> tuple[float, dict]:
    """(ms per replay of the step's calls, {shape: seconds in the best replay})."""
    best, best_split = float("inf"), {}
    with torch.inference_mode():
        for _ in range(passes):
            split = defaultdict(float)
            start = time.perf_counter()
            for _, op, args in calls:
                t = time.perf_counter()
                op(*args)
                split[shape_of(args)] += time.perf_counter() - t
            total = time.perf_counter() - start
            if total < best:
                best, best_split = total, split
    return 1e3 * best, best_split


def fixed_cost_us(name: str, dtype: torch.dtype) -> float:
    x = torch.randn(1, 32, dtype=dtype)
    if name == "int8_matvec":
        args = (x, torch.randint(-127, 128, (64, 32), dtype=torch.int8), torch.rand(64, dtype=dtype))
    else:
        args = (x, torch.randint(0, 256, (64, 16), dtype=torch.uint8), torch.rand(64, 1, dtype=dtype), 32)
    op = getattr(cpu_kernels, name)
    with torch.inference_mode():
        return 1e6 * best_time(lambda: [op(*args) for _ in range(2000)], "cpu", 3) / 2000


def isolated_cold_gbs(calls, l3_bytes: int = 32 << 20) -> dict:
    """{shape: GB/s of its calls alone, over enough copies of its matrix to miss every cache}."""
    out = {}
    with torch.inference_mode():
        for shape in dict.fromkeys(shape_of(args) for _, _, args in calls):
            name, op, args = next(c for c in calls if shape_of(c[2]) == shape)
            copies = -(-8 * l3_bytes // nbytes(args))
            sets = [(args[0], args[1].clone(), args[2].clone(), *args[3:]) for _ in range(copies)]
            out[shape] = copies * nbytes(args) / best_time(lambda: [op(*a) for a in sets], "cpu", 3) / 1e9
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mistral-llamacpp")
    p.add_argument("--size", default="0.5b", choices=["small", "0.5b"])
    p.add_argument("--quantize", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {a.threads} threads, "
          f"kernels {cpu_kernels.isa()}; load average {load_average()}", flush=True)
    folder, _ = ensure_checkpoints(a.cache, a.size)
    tokenizer = Tokenizer.from_path(folder)
    prompt = tokenizer.encode("The weights of a language model are read once for every token", bos=True)
    dtype = getattr(torch, a.dtype)
    for spec in a.quantize:
        model = load_model(folder, dtype=a.dtype, quantize=spec, kernels="auto", max_seq_len=256, quiet=True)
        calls = record_calls(model, 8)
        total_bytes = sum(nbytes(args) for _, _, args in calls)
        eager = eager_step_ms(model, a.steps)
        compiled = float("nan")
        if not a.no_compile:
            engine = Engine(model, max_batch=1, max_seq_len=256, eos_id=tokenizer.eos_id, compile=True)
            our_decode(engine, prompt, 8)  # compiles
            compiled = 1e3 / max(our_decode(engine, prompt, a.steps)[0] for _ in range(3))
        kernels_ms, split = replay(calls)
        name = calls[0][0]
        fixed = fixed_cost_us(name, dtype)
        cold = isolated_cold_gbs(calls)
        print(f"\n## {spec} ({a.dtype} activations): {len(calls)} mat-vec calls a step, {total_bytes / 1e6:.0f} MB")
        print(f"step: eager {eager:.1f} ms, compiled {compiled:.1f} ms; the kernels alone (replay) {kernels_ms:.1f} ms "
              f"= {total_bytes / kernels_ms / 1e6:.1f} GB/s; fixed cost of one call {fixed:.1f} us "
              f"(x {len(calls)} = {fixed * len(calls) / 1e3:.1f} ms)")
        print("| shape [N, K] | calls | ms in the replay | GB/s in the replay | GB/s alone, cold |")
        print("|---|---|---|---|---|")
        counts = defaultdict(int)
        for _, _, args in calls:
            counts[shape_of(args)] += 1
        for shape, seconds in split.items():
            args = next(c[2] for c in calls if shape_of(c[2]) == shape)
            gbs = counts[shape] * nbytes(args) / seconds / 1e9
            print(f"| {list(shape)} | {counts[shape]} | {1e3 * seconds:.2f} | {gbs:.1f} | {cold[shape]:.1f} |")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
