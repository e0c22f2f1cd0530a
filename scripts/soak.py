"""Soak: 1,000+ mixed requests with cancellations against one `mistral serve`, its memory sampled.

    python scripts/soak.py                              # a small random checkpoint, its own server
    python scripts/soak.py --requests 5000 --clients 16

The requests are scripts/chaos.py's (chat and text, streamed or not, n 1-3, stop strings, ~30%
abandoned mid-stream), and each answer is checked the same way. The server's resident memory
(VmRSS of its process) is sampled every half second against the requests sent so far. The figure
is the growth per 1,000 requests after warm-up: the least-squares slope of RSS over requests, for
the samples after the first --warm-up requests (allocator pools, first-use caches and compilation
fill up there). A leak shows as a slope that stays positive however long the run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench_server import start_server
from chaos import chaos


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0


async def soak(url: str, pid: int, a) -> tuple[dict, list[str], list[tuple[int, float]]]:
    samples: list[tuple[int, float]] = []
    stats: dict = {}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append((stats.get("sent", 0), rss_mib(pid)))
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    try:
        _, failures = await chaos(url, a.model, a.api_key, clients=a.clients, seconds=float("inf"),
                                  disconnect=a.disconnect, seed=a.seed, requests=a.requests, stats=stats)
    finally:
        done.set()
        await sampler
    samples.append((stats["sent"], rss_mib(pid)))
    return stats, failures, samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="a weights folder (default: a random one of --preset)")
    p.add_argument("--preset", default="small")
    p.add_argument("--requests", type=int, default=1200)
    p.add_argument("--warm-up", type=int, default=200, help="requests left out of the growth figure")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--disconnect", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--kernels", default="torch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    a.model, a.api_key = "soak", "sk-soak"

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(a.weights) if a.weights else None
        if weights is None:
            from mistral.args import preset
            from mistral.make_random import make_random

            weights = make_random(Path(tmp) / a.preset, preset(a.preset), "consolidated", "float32")
        process, url = start_server(weights, a)
        try:
            start = time.monotonic()
            stats, failures, samples = asyncio.run(soak(url, process.pid, a))
            seconds = time.monotonic() - start
        finally:
            process.terminate()
            process.wait(timeout=60)

    after = [(n, mib) for n, mib in samples if n >= a.warm_up]
    growth = slope(after) * 1000 if len(after) >= 2 else float("nan")
    print(f"{stats['sent']} requests ({stats['complete']} complete, {stats['disconnected']} abandoned, "
          f"{len(failures)} failed) in {seconds:.0f} s, {a.clients} clients on {a.max_batch} rows")
    print(f"RSS: {samples[0][1]:.0f} MiB at the start, {after[0][1] if after else float('nan'):.0f} MiB after "
          f"{a.warm_up} requests, {samples[-1][1]:.0f} MiB at the end (max {max(m for _, m in samples):.0f})")
    print(f"growth after warm-up: {growth:+.1f} MiB per 1,000 requests ({len(after)} samples)")
    print(f"machine: {platform.machine()} {platform.system()}, python {platform.python_version()}, "
          f"{datetime.date.today()}; command: python scripts/soak.py {' '.join(sys.argv[1:])}")
    for failure in failures[:20]:
        print("  " + failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
