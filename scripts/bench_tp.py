"""Benchmark: tensor parallelism on this CPU, TP=1 against TP=2 (gloo), as a correctness and overhead figure.

Two processes on a 2-core machine split the cores, not add to them: this measures what the split
costs (the collectives, the replayed calls), not a speed-up. Each configuration runs in its own
`torchrun --standalone` launch of this script, and the configurations alternate, --runs times:

  TP=1, 2 threads   the plain model, as `mistral generate` runs it here
  TP=1, 1 thread    the same with one thread: the compute one rank of TP=2 has
  TP=2, 1 thread each
  the same three with the decode step compiled (`Engine(compile=True)`: rank 0's compiled step,
                    the followers' compiled replay, the collectives inside both graphs)
  TP=2 compiled, with a graph break at each collective instead (fullgraph off): the alternative

What each launch measures (batch 1, greedy, fp32, EOS ignored):

  decode tok/s   `Engine` (engine.py) through rank 0's `Leader` (tp_replay.py): --tokens new tokens after
                 a 16-token prompt; (tokens - 1) / time from the first token to the last, and 1 / the
                 median time between two tokens. The greedy tokens of every launch must be the same
                 (printed loudly otherwise, exit status 1). Warm-up: the first 4 tokens (with compile,
                 the compilation of the batch-1 greedy step).
  collectives    (TP=2, eager launches) the median time of each collective a decode step makes,
                 each timed alone over 200 calls: all-reduce of [1, 1, dim] fp32 (2 per layer), all-gather of the logits'
                 slices [1, 1, vocab / 2], and rank 0's two broadcasts (the 9-int64 header, the step's
                 token and position); their sum per step, and its share of the step.
  output head    (TP=2) the vocabulary split with a gather, against a replicated head: one rank's
                 mat-vec over vocab / 2 rows plus the gather, and a mat-vec over all rows (median of 50).

    python scripts/bench_tp.py [--cache weights/bench] [--preset 0.5b] [--tokens 64] [--runs 2]

The random checkpoint (0.5b fp32: 2 GB) is written under --cache if absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# (name, ranks, threads, how the decode step runs: eager, compiled, or compiled with a graph break
# at each collective instead of the functional collectives inside the graph (tp.py))
CONFIGS = [("TP=1, 2 threads", 1, None, "eager"), ("TP=1, 1 thread", 1, 1, "eager"), ("TP=2, 1 thread each", 2, 1, "eager"),
           ("TP=1, 2 threads, compiled", 1, None, "compiled"), ("TP=1, 1 thread, compiled", 1, 1, "compiled"),
           ("TP=2, 1 thread each, compiled", 2, 1, "compiled"),
           ("TP=2, compiled, graph breaks at collectives", 2, 1, "graph-breaks")]
PROMPT_LEN = 16


def collectives(args, shard) -> dict:
    """Each collective of a decode step, timed alone on every rank (rank 0's figures are kept), and
    the output head split (one rank's mat-vec + the gather) against replicated."""
    from mistral.bench.collectives import median_time, step_collectives
    from mistral.ops import cpu_linear as linear

    t = step_collectives(args, shard)
    x = torch.randn(1, 1, args.dim)
    w_half = torch.randn(args.vocab_size // shard.world, args.dim) * 0.02
    w_full = torch.randn(args.vocab_size, args.dim) * 0.02
    t["head_split"] = median_time(lambda: linear(x, w_half), 50) + t["all_gather"]
    t["head_replicated"] = median_time(lambda: linear(x, w_full), 50)
    return t


def break_graphs_at_collectives() -> None:
    """The alternative to functional collectives traced into the graph: each collective left out of
    it (a graph break), which needs fullgraph=False wherever the decode step is compiled."""
    from mistral import tp

    compile_ = torch.compile
    torch.compile = lambda fn, **kwargs: compile_(fn, **{**kwargs, "fullgraph": False})
    tp.all_reduce, tp.all_gather = torch.compiler.disable(tp.all_reduce), torch.compiler.disable(tp.all_gather)


def worker(a) -> None:
    from mistral import tp
    from mistral.bench.timing import decode_rates, stamp_tokens
    from mistral.engine import Engine
    from mistral.loader import find_checkpoint, load_model

    args = find_checkpoint(a.weights).args()
    figures: dict = {"threads": torch.get_num_threads()}
    if a.mode == "graph-breaks":
        break_graphs_at_collectives()
    if tp.launched():
        shard, _ = tp.init(torch.device("cpu"))
        if a.mode == "eager":
            figures["collectives"] = collectives(args, shard)
    model = load_model(a.weights, max_seq_len=512, quiet=True)  # rank 0 only gets past this under TP
    engine = Engine(model, max_batch=1, max_seq_len=512, compile=a.mode != "eager")
    prompt = torch.randint(3, args.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0)).tolist()

    start = time.perf_counter()
    stamp_tokens(engine, prompt, 4)  # first-call allocations, compilation
    figures["warm_up_s"] = time.perf_counter() - start
    stamps = stamp_tokens(engine, prompt, a.tokens)
    tok_s, median_rate = decode_rates([[t for t, _ in stamps]])
    figures.update(tokens=[token for _, token in stamps], tok_s=tok_s, median_step_s=1 / median_rate)
    Path(a.out).write_text(json.dumps(figures))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=ROOT / "weights" / "bench")
    p.add_argument("--preset", default="0.5b")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="eager", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return 0

    from mistral.args import preset
    from mistral.make_random import make_random
    from mistral.bench.timing import cpu_name

    weights = a.cache / f"{a.preset}-float32-consolidated"
    if not (weights / "params.json").exists():
        print(f"writing a random {a.preset} checkpoint to {weights} ...", flush=True)
        make_random(weights, preset(a.preset), "consolidated", "float32", seed=0, tokenizer=False)
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {datetime.date.today()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name, _, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(a.runs):
            for name, n, threads, mode in CONFIGS:
                out = Path(tmp) / f"{run}-{n}-{threads}-{mode}.json"
                env = {**os.environ, "PYTHONPATH": str(ROOT)}
                env.pop("OMP_NUM_THREADS", None)
                if threads is not None:
                    env["OMP_NUM_THREADS"] = str(threads)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                       __file__, "--worker", "--weights", str(weights), "--out", str(out), "--tokens", str(a.tokens),
                       "--mode", mode]
                subprocess.run(cmd, check=True, env=env, stderr=subprocess.DEVNULL)
                results[name].append(json.loads(out.read_text()))
                r = results[name][-1]
                print(f"run {run + 1}  {name:44s} {r['tok_s']:6.1f} tok/s  median step {r['median_step_s'] * 1e3:6.1f} ms  "
                      f"warm-up {r['warm_up_s']:5.1f} s", flush=True)

    reference = results[CONFIGS[0][0]][0]["tokens"]
    same = all(r["tokens"] == reference for rs in results.values() for r in rs)
    print(f"\n| configuration | decode tok/s (best of {a.runs}) | median step (ms) | warm-up (s) |\n|---|---|---|---|")
    for name, rs in results.items():
        print(f"| {name} | {max(r['tok_s'] for r in rs):.1f} | {min(r['median_step_s'] for r in rs) * 1e3:.1f} | "
              f"{min(r['warm_up_s'] for r in rs):.1f} |")
    c = [r["collectives"] for r in results[CONFIGS[2][0]]]
    best = {k: min(x[k] for x in c) for k in c[0]}
    step = min(r["median_step_s"] for r in results[CONFIGS[2][0]])
    n_layers = preset(a.preset).n_layers
    print(f"\nTP=2 collectives (median of 200 each, best of {a.runs} launches): all-reduce [1, 1, dim] "
          f"{best['all_reduce'] * 1e6:.0f} us x {2 * n_layers}, all-gather of the logits {best['all_gather'] * 1e6:.0f} us, "
          f"header broadcast {best['header'] * 1e6:.0f} us, step-input broadcast {best['payload'] * 1e6:.0f} us: "
          f"{best['per_step'] * 1e3:.2f} ms per step = {100 * best['per_step'] / step:.0f}% of the TP=2 median step")
    print(f"output head on one rank: split + gather {best['head_split'] * 1e3:.2f} ms, replicated "
          f"{best['head_replicated'] * 1e3:.2f} ms")
    print(f"greedy tokens identical across all launches: {same}")
    if not same:
        differ = [name for name, rs in results.items() if any(r["tokens"] != reference for r in rs)]
        print(f"!!! other greedy tokens than {CONFIGS[0][0]}'s from: {', '.join(differ)} !!!")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
