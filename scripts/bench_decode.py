"""Benchmark: greedy decode speed on this CPU, against transformers and against the memory floor.

For each size ("small": dim 256, 2 layers; "0.5b": dim 1536, 16 layers) and dtype (fp32, bf16):

  floor         At batch 1 a decode step reads every weight once and does two FLOPs per weight read,
                so it is bound by memory: floor tok/s = matrix-vector bandwidth / weight bytes per
                token. The bytes are every matrix of every layer, the norms and the output head; not
                the embedding table, of which a step reads one row. The bandwidth is measured here:
                `x [1, K] @ W [N, K]ᵀ` over the model's own matrices in the model's order, in the
                dtype under test, from main memory (copies of the matrices when the model is smaller
                than 256 MiB, so that none is still cached), best of several passes, and the fastest
                of three ways: `F.linear`, the CPU `linear` of mistral/ops.py, and that `linear` compiled.
  ours          `Engine` from `mistral/engine.py` (PyTorch ops), batch 1, greedy, 128 new tokens,
                EOS ignored, twice: eager, and with `compile=True` (the decode step through
                torch.compile; its compilation happens in a warm-up run and is reported apart).
                The decode phase only: from the first token (which prefill makes) to the last, so
                the rate is 127 tokens over that span, best of --runs; and the "median step" rate,
                1 / the median time between two tokens over all runs.
  transformers  `MistralForCausalLM` (attn_implementation="eager") loaded from a Hugging Face-format
                copy written with the same seed (the same model), `generate(max_new_tokens=128,
                min_new_tokens=128, do_sample=False)`; a streamer timestamps the tokens, and the rate
                is likewise 127 tokens from the first generated token to the last (and the median step).

The greedy tokens of ours (both ways) and transformers' must agree in fp32 (a mismatch is printed loudly and the exit status is 1).
In bf16 the two round differently and may part ways after a near-tie; that is only reported.

    python scripts/bench_decode.py [--cache weights/bench] [--sizes small 0.5b] [--dtypes float32 bfloat16]

The random checkpoints (fp32; 0.07 GB and 2 GB per format) are written under --cache if absent.
The run takes 6-8 minutes on a 2-core machine (compilations included). Busy neighbours slow every
column, and with torch's 2 threads a busy second core stalls each parallel region: run it on an idle
machine (the load average is printed at the start and the end). Ours (both ways) and transformers
run alternately.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mistral.bench.timing import (best_time, cpu_name, decode_rates, load_average, matvec_bandwidth, stamp_tokens,
                                  weight_bytes_per_token)
from mistral.engine import Engine
from mistral.formats import dtype_name
from mistral.loader import load_model
from mistral.make_random import random_checkpoints
from mistral.tokenizer import Tokenizer

PROMPT = "The weights of a language model are read once for every token it writes, so"
NEW_TOKENS = 128


# --- the floor ---------------------------------------------------------------------------------------


def machine_bandwidth(nbytes: int = 400 * 2**20, passes: int = 5) -> tuple[float, float, float]:
    """For context, in fp32 from main memory: bytes/s of (a) `torch.sum` (all threads), (b) one
    `F.linear` mat-vec, (c) the same mat-vec split by rows over two Python threads.

    PyTorch runs an fp32 mat-vec on one thread whatever `torch.set_num_threads` says, so (b) is what
    the floor above measures, while (a) and (c) show what the memory gives two cores.
    """
    from concurrent.futures import ThreadPoolExecutor

    W = torch.randn(nbytes // 4 // 4096, 4096)
    x = torch.randn(1, 4096)
    top, bottom = W.chunk(2)

    def halves() -> None:
        other = pool.submit(F.linear, x, bottom)
        F.linear(x, top)
        other.result()

    def rate(fn) -> float:
        fn()
        return W.numel() * 4 / best_time(fn, "cpu", passes)

    with ThreadPoolExecutor(1) as pool, torch.inference_mode():
        return rate(W.sum), rate(lambda: F.linear(x, W)), rate(halves)


# --- ours ----------------------------------------------------------------------------------------------


def our_decode(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    """(the time each token arrived, the tokens): greedy, EOS ignored, batch 1."""
    stamps = stamp_tokens(engine, prompt, new_tokens)
    assert len(stamps) == new_tokens, f"expected {new_tokens} tokens, got {len(stamps)}"
    return [t for t, _ in stamps], [token for _, token in stamps]


# --- transformers -------------------------------------------------------------------------------------


class _Stamps:
    """A `generate` streamer that records when each new token arrives (the prompt comes first)."""

    def __init__(self):
        self.times: list[float] = []
        self.seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_decode(model, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
    ids = torch.tensor([prompt])
    stamps = _Stamps()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, streamer=stamps, pad_token_id=0)
    tokens = out[0, len(prompt):].tolist()
    assert len(tokens) == new_tokens == len(stamps.times), (len(tokens), len(stamps.times))
    return stamps.times, tokens


def load_hf(folder: Path, dtype: torch.dtype):
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # ignore EOS, like ours
    return model.eval()


# --- the run -----------------------------------------------------------------------------------------


def bench(size: str, dtype: torch.dtype, cache: Path, runs: int, new_tokens: int, with_hf: bool) -> dict:
    ours_folder, hf_folder = random_checkpoints(cache, size)
    model = load_model(ours_folder, device="cpu", dtype=dtype, kernels="torch", max_seq_len=512, quiet=True)
    tokenizer = Tokenizer.from_path(ours_folder)
    prompt = tokenizer.encode(PROMPT, bos=True)
    engines = {"eager": Engine(model, max_batch=1, max_seq_len=512, eos_id=tokenizer.eos_id),
               "compiled": Engine(model, max_batch=1, max_seq_len=512, eos_id=tokenizer.eos_id, compile=True)}
    hf = load_hf(hf_folder, dtype) if with_hf else None

    row = {"size": size, "dtype": dtype_name(dtype), "bytes": weight_bytes_per_token(model)}
    row["bandwidth"] = matvec_bandwidth(model)
    for name, engine in engines.items():  # warm-up: first-call allocations, thread pools, the compilation
        start = time.perf_counter()
        our_decode(engine, prompt, 8)
        row[f"warmup_{name}"] = time.perf_counter() - start
    if hf is not None:
        hf_decode(hf, prompt, 8)
    timed = {name: [] for name in engines}
    theirs = []
    for _ in range(runs):  # alternate, so that all see the same background load
        for name, engine in engines.items():
            timed[name].append(our_decode(engine, prompt, new_tokens))
        if hf is not None:
            theirs.append(hf_decode(hf, prompt, new_tokens))
    again = matvec_bandwidth(model)  # again, after the runs
    row["bandwidth"] = {way: max(rate, again[way]) for way, rate in row["bandwidth"].items()}
    for name, results in timed.items():
        row[name], row[f"{name}_median"] = decode_rates([times for times, _ in results])
        row[f"{name}_tokens"] = results[0][1]
    if hf is not None:
        row["hf"], row["hf_median"] = decode_rates([times for times, _ in theirs])
        row["hf_tokens"] = theirs[0][1]
    del model, engines, hf
    gc.collect()
    return row


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("weights/bench"), help="where the random checkpoints live")
    p.add_argument("--sizes", nargs="+", default=["small", "0.5b"], choices=["small", "0.5b", "7b-v0.3"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--runs", type=int, default=3, help="timed generations per engine")
    p.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--no-transformers", action="store_true", help="time ours only")
    a = p.parse_args()

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {datetime.date.today()}; load average {load_average()}", flush=True)
    total, one, two = machine_bandwidth()
    print(f"fp32 reads from memory: torch.sum {total / 1e9:.1f} GB/s, F.linear mat-vec {one / 1e9:.1f} GB/s, "
          f"the same split over two threads {two / 1e9:.1f} GB/s", flush=True)
    rows, mismatch = [], False
    for size in a.sizes:
        for name in a.dtypes:
            start = time.perf_counter()
            row = bench(size, getattr(torch, name), a.cache, a.runs, a.new_tokens, not a.no_transformers)
            rows.append(row)
            line = (f"{size} {name}: ours eager {row['eager']:.1f} tok/s (median step {row['eager_median']:.1f}), "
                    f"compiled {row['compiled']:.1f} tok/s (median step {row['compiled_median']:.1f}; "
                    f"first 8 tokens with the compilation {row['warmup_compiled']:.0f} s)")
            if "hf" in row:
                line += f", transformers {row['hf']:.1f} tok/s (median step {row['hf_median']:.1f})"
                for ours in ("eager", "compiled"):
                    diff = first_difference(row[f"{ours}_tokens"], row["hf_tokens"])
                    row[f"{ours}_match"] = "yes" if diff is None else f"no (from token {diff})"
                    if diff is not None and name == "float32":
                        mismatch = True
                        print(f"!!! MISMATCH: our {ours} greedy tokens differ from transformers' at token {diff} "
                              f"({size} fp32)\n    ours: {row[f'{ours}_tokens']}\n    hf:   {row['hf_tokens']}", flush=True)
            bw = ", ".join(f"{way} {rate / 1e9:.1f}" for way, rate in row["bandwidth"].items())
            print(f"{line}  ({time.perf_counter() - start:.0f} s)\n    mat-vec GB/s: {bw}", flush=True)

    print(f"\nload average at the end: {load_average()} (other processes on the machine slow every column)")
    print("| size | dtype | weights read / token | mat-vec bandwidth (way) | floor | ours eager, best run (% of floor) "
          "| ours compiled, best run (% of floor) | transformers eager, best run | compiled / transformers "
          "| median step: eager / compiled / transformers | same greedy tokens (eager, compiled) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        way, bandwidth = max(r["bandwidth"].items(), key=lambda item: item[1])
        floor = bandwidth / r["bytes"]
        hf, hf_ratio, hf_median = "-", "-", "-"
        if "hf" in r:
            hf, hf_ratio, hf_median = f"{r['hf']:.1f} tok/s", f"{r['compiled'] / r['hf']:.2f}x", f"{r['hf_median']:.1f}"
        print(f"| {r['size']} | {r['dtype']} | {r['bytes'] / 1e6:.1f} MB | {bandwidth / 1e9:.1f} GB/s ({way}) "
              f"| {floor:.1f} tok/s | {r['eager']:.1f} tok/s ({r['eager'] / floor:.0%}) "
              f"| {r['compiled']:.1f} tok/s ({r['compiled'] / floor:.0%}) | {hf} | {hf_ratio} "
              f"| {r['eager_median']:.1f} / {r['compiled_median']:.1f} / {hf_median} tok/s "
              f"| {r.get('eager_match', '-')}, {r.get('compiled_match', '-')} |")
    sys.exit(1 if mismatch else 0)


if __name__ == "__main__":
    main()
