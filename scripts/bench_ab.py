"""A/B benchmark of two revisions on this CPU: compiled decode and serving, interleaved in one run.

    python scripts/bench_ab.py OLD_REV NEW_REV [--rounds 5] [--sizes small 0.5b] [--dtypes float32 bfloat16]
    python scripts/bench_ab.py 3db7cd4 HEAD --quick          # a smoke run: small, few tokens, 2 rounds

Both revisions are exported (`git archive`: tracked files only, nothing in the repository changes)
into temporary folders, and each side runs in its own subprocess with its folder as working
directory and on PYTHONPATH, so that it imports its own `mistral`. The random checkpoints are
written once (with this tree's `mistral make-random`; its output for a seed is the same at every
revision) and read by both sides. What is measured, A B A B ... for --rounds rounds:

  decode   per size and dtype: one worker process per side holds `Engine(model, compile=True)`
           (the PyTorch ops, batch 1, greedy, EOS ignored); its compilation is a warm-up before
           round 1. Each round asks each worker for --tokens new tokens after a 16-token prompt;
           the figure is tokens/s from the first token to the last (the decode phase).
  serving  one `mistral serve` per side, both started before round 1 (small preset). Each round
           runs scripts/bench_server.py's client levels, 1 and 8 concurrent clients, against each
           server in turn: aggregate completion tokens/s from the client side.

Printed per case: the median over rounds of each side, new/old (> 1: the new revision is faster),
and every round's figures. Only the two sides' ratio means anything on a shared machine; the
rounds alternate so that both see the same background load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = list(range(100, 116))  # 16 token ids: no tokenizer needed


# --- the worker: runs inside one side's tree ---------------------------------------------------------


def worker(weights: str, dtype: str, max_seq_len: int) -> None:
    """Load the model, compile the engine's decode step, then answer each stdin line `N` with one
    JSON line: the arrival times of N greedy tokens. Uses only what every revision has
    (`load_model`, `Engine`, `GenerationParams`, `TokenEvent`): an older side has no
    `mistral.bench.timing.stamp_tokens`, so the token stamps are taken here, and the rates are
    computed by the parent, with this tree's `decode_rates`, alike for both sides."""
    import torch

    import mistral
    from mistral.engine import Engine, GenerationParams, TokenEvent
    from mistral.loader import load_model

    model = load_model(weights, device="cpu", dtype=getattr(torch, dtype), kernels="torch", max_seq_len=max_seq_len,
                       quiet=True)
    engine = Engine(model, max_batch=1, max_seq_len=max_seq_len, compile=True)

    def run(n: int) -> list[float]:
        times: list[float] = []
        params = GenerationParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        engine.add(PROMPT, params, lambda e: times.append(time.perf_counter()) if isinstance(e, TokenEvent) else None)
        engine.run_until_idle()
        return times

    start = time.perf_counter()
    run(8)  # compiles the decode step
    print(json.dumps({"mistral": mistral.__file__, "warmup_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        print(json.dumps(run(int(line))), flush=True)


class Side:
    """One revision: its exported tree, and the environment that makes a subprocess import it."""

    def __init__(self, name: str, rev: str, tree: Path):
        self.name, self.rev, self.tree = name, rev, tree
        self.env = {**os.environ, "PYTHONPATH": str(tree)}

    def start_decoder(self, weights: Path, dtype: str, max_seq_len: int) -> subprocess.Popen:
        cmd = [sys.executable, __file__, "--worker", "--weights", str(weights), "--dtype", dtype,
               "--max-seq-len", str(max_seq_len)]
        return subprocess.Popen(cmd, cwd=self.tree, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)


def ask(worker: subprocess.Popen) -> dict | list:
    line = worker.stdout.readline()
    if not line:
        raise SystemExit(f"a decode worker exited (status {worker.wait()}); its error is above")
    return json.loads(line)


def export(rev: str, folder: Path) -> str:
    """The tracked files of `rev` into `folder`; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.strip()
    folder.mkdir(parents=True)
    archive = subprocess.Popen(["git", "archive", commit], cwd=ROOT, stdout=subprocess.PIPE)
    with tarfile.open(fileobj=archive.stdout, mode="r|") as tar:
        tar.extractall(folder, filter="data")
    if archive.wait() != 0:
        raise SystemExit(f"git archive {rev} failed")
    return commit


def decode_case(sides: list[Side], weights: Path, dtype: str, a) -> dict[str, list[float]]:
    """Tokens/s of each side's compiled decode, one figure per round."""
    from mistral.bench.timing import decode_rates

    workers = [side.start_decoder(weights, dtype, a.max_seq_len) for side in sides]
    try:
        for side, w in zip(sides, workers):
            hello = ask(w)
            if not Path(hello["mistral"]).resolve().is_relative_to(side.tree.resolve()):
                raise SystemExit(f"side {side.name} imported {hello['mistral']}, not its own tree {side.tree}")
            print(f"  {side.name}: compiled in {hello['warmup_s']:.0f} s", flush=True)
        rates: dict[str, list[float]] = {side.name: [] for side in sides}
        for _ in range(a.rounds):
            for side, w in zip(sides, workers):
                w.stdin.write(f"{a.tokens}\n")
                w.stdin.flush()
                rates[side.name].append(decode_rates([ask(w)])[0])
        return rates
    finally:
        for w in workers:
            w.stdin.close()
            w.wait(timeout=60)


def serving_case(sides: list[Side], weights: Path, a) -> dict[str, dict[str, list[float]]]:
    """Aggregate tokens/s of each side's server at 1 and 8 clients, one figure per round."""
    import bench_server

    levels = (1, 8)
    args = bench_server.parse_args(["--max-tokens", str(a.server_tokens), "--requests", str(a.server_requests),
                                    "--max-batch", "8", "--max-seq-len", "256", "--kernels", "torch"])
    servers = []
    try:
        for side in sides:
            servers.append(bench_server.start_server(weights, args, env=side.env, cwd=side.tree))
        for _, url in servers:
            asyncio.run(bench_server.level(url, args, 1))  # warm-up
        figures = {f"{c} client{'s' if c > 1 else ''}": {side.name: [] for side in sides} for c in levels}
        for _ in range(a.rounds):
            for side, (_, url) in zip(sides, servers):
                for c, key in zip(levels, figures):
                    figures[key][side.name].append(asyncio.run(bench_server.level(url, args, c))["tokens_per_s"])
        return figures
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", nargs="?", help="the old revision (A)")
    p.add_argument("new", nargs="?", help="the new revision (B)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sizes", nargs="+", default=["small", "0.5b"], choices=["small", "0.5b"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    p.add_argument("--cases", nargs="+", default=["decode", "serving"], choices=["decode", "serving"])
    p.add_argument("--tokens", type=int, default=128, help="new tokens per decode run")
    p.add_argument("--server-tokens", type=int, default=64, help="max_tokens of each serving request")
    p.add_argument("--server-requests", type=int, default=3, help="requests per client per level")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--cache", type=Path, default=ROOT / "weights" / "bench", help="where the random checkpoints live")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: the small preset, 2 rounds, 16 decode tokens, 1 short request per client")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.weights, a.dtype, a.max_seq_len)
        return 0
    if a.old is None or a.new is None:
        p.error("give two revisions: OLD_REV NEW_REV")
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # this tree's mistral and bench_server (a worker imports its side's)
    if a.quick:
        a.sizes, a.rounds, a.tokens, a.server_tokens, a.server_requests = ["small"], 2, 16, 8, 1

    from mistral.bench.timing import cpu_name, load_average
    from mistral.make_random import random_checkpoints

    print(f"# {cpu_name()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load average {load_average()}", flush=True)
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ab-") as tmp:
        sides = []
        for name, rev in (("old", a.old), ("new", a.new)):
            commit = export(rev, Path(tmp) / name)
            sides.append(Side(name, rev, Path(tmp) / name))
            print(f"# {name}: {rev} = {commit[:12]}", flush=True)
        weights = {size: random_checkpoints(a.cache, size, formats=("consolidated",))[0] for size in a.sizes}
        if "decode" in a.cases:
            for size in a.sizes:
                for dtype in a.dtypes:
                    case = f"decode {size} {dtype}, compiled, tok/s"
                    print(f"{case} ...", flush=True)
                    results[case] = decode_case(sides, weights[size], dtype, a)
        if "serving" in a.cases:
            print("serving small, tok/s ...", flush=True)
            served = weights.get("small") or random_checkpoints(a.cache, "small", formats=("consolidated",))[0]
            for level, figures in serving_case(sides, served, a).items():
                results[f"serving small, {level}, tok/s"] = figures

    print(f"\n# load average at the end: {load_average()}; {a.rounds} rounds, old and new alternating")
    print(f"| case | old ({a.old}), median | new ({a.new}), median | new / old | old, each round | new, each round |")
    print("|---|---|---|---|---|---|")
    for case, figures in results.items():
        old, new = statistics.median(figures["old"]), statistics.median(figures["new"])
        rounds = [" ".join(f"{x:.1f}" for x in figures[side]) for side in ("old", "new")]
        print(f"| {case} | {old:.1f} | {new:.1f} | {new / old:.3f} | {rounds[0]} | {rounds[1]} |")
    if a.json:
        a.json.write_text(json.dumps({"old": a.old, "new": a.new, "rounds": a.rounds, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
