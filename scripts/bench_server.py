"""Serving benchmark: aggregate generated tokens/s and time to first token at N concurrent clients.

    python scripts/bench_server.py                      # a small random checkpoint, its own server
    python scripts/bench_server.py --preset 0.5b --clients 1,8,32
    python scripts/bench_server.py --url http://127.0.0.1:8000 --model NAME --api-key KEY

Without --url it writes a random checkpoint (--preset, or --weights for a real one), starts
`mistral serve` on a free loopback port and stops it at the end. Each of N clients sends --requests
streaming requests one after another (distinct prompts, `ignore_eos` so every answer has exactly
--max-tokens tokens); a client's next request joins the running batch at a step boundary, which
is the continuous batching under test. Measured from the client side, as a user sees it:

    tokens/s   all completion tokens (from `usage`, include_usage) / wall time of the whole level
    TTFT       request sent -> first chunk with content (mean, p50, max over all requests)

The clients parse SSE with httpx directly: on a 2-core machine, a heavier client would take CPU
from the server it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(weights: Path, a, env: dict | None = None, cwd: Path | None = None,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`mistral serve` with the flags of `a` and `extra` on a free loopback port, healthy; `env` and
    `cwd` choose which `mistral` it runs (scripts/bench_ab.py serves two revisions side by side)."""
    port = free_port()
    cmd = [sys.executable, "-m", "mistral.cli", "serve", str(weights), "--port", str(port), "--served-model-name",
           a.model, "--max-batch", str(a.max_batch), "--max-seq-len", str(a.max_seq_len), "--kernels", a.kernels]
    if a.device:
        cmd += ["--device", a.device]
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    env = {**(os.environ if env is None else env), "MISTRAL_API_KEY": a.api_key}
    process = subprocess.Popen(cmd + list(extra), env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the server never became healthy")


async def one_request(http: httpx.AsyncClient, url: str, a, prompt: str) -> tuple[float, int]:
    """(seconds to the first content chunk, completion tokens) of one streamed chat completion."""
    body = {"model": a.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": a.max_tokens,
            "ignore_eos": True, "temperature": a.temperature, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async for chunk in sse_chunks(http, f"{url}/v1/chat/completions", body):
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - start
    return ttft if ttft is not None else float("nan"), tokens


async def sse_chunks(http: httpx.AsyncClient, url: str, body: dict):
    """The parsed chunks of one streamed request."""
    async with http.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise SystemExit(f"HTTP {r.status_code}: {(await r.aread()).decode()}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def level(url: str, a, clients: int) -> dict:
    headers = {"Authorization": f"Bearer {a.api_key}"}
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(headers=headers, timeout=None, limits=limits) as http:

        async def client(i: int) -> list[tuple[float, int]]:
            return [await one_request(http, url, a, f"Client {i}, request {k}: write a long story about the sea.")
                    for k in range(a.requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ttfts = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "ttft_mean_s": statistics.mean(ttfts),
            "ttft_p50_s": statistics.median(ttfts), "ttft_max_s": max(ttfts)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one)")
    p.add_argument("--weights", type=Path, default=None, help="a checkpoint to serve (default: a random --preset one)")
    p.add_argument("--preset", default="small")
    p.add_argument("--model", default="bench", help="the served model name")
    p.add_argument("--api-key", default="sk-bench")
    p.add_argument("--clients", default="1,8,32", help="concurrency levels (default 1,8,32)")
    p.add_argument("--requests", type=int, default=3, help="requests per client, one after another (default 3)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--threads", type=int, default=None, help="the server's CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def main() -> None:
    a = parse_args()
    levels = [int(c) for c in a.clients.split(",")]

    process = None
    url = a.url
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            weights = a.weights
            if weights is None:
                from mistral.args import preset
                from mistral.make_random import make_random

                dtype = "bfloat16" if (a.device or "").startswith("cuda") else "float32"
                weights = make_random(Path(tmp) / a.preset, preset(a.preset), "consolidated", dtype)
            process, url = start_server(weights, a)
        try:
            asyncio.run(level(url, a, 1))  # warm-up: first-call allocations, caches
            rows = [asyncio.run(level(url, a, c)) for c in levels]
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=30)

    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d')}")
    print(f"# preset {a.preset}, max_tokens {a.max_tokens}, {a.requests} requests per client, "
          f"server max_batch {a.max_batch}, max_seq_len {a.max_seq_len}, threads {a.threads or 'default'}")
    print("| clients | requests | tokens | wall (s) | tokens/s | TTFT mean (s) | TTFT p50 (s) | TTFT max (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['ttft_mean_s']:.3f} | {r['ttft_p50_s']:.3f} | {r['ttft_max_s']:.3f} |")
    by = {r["clients"]: r for r in rows}
    if 1 in by and 8 in by:
        print(f"# 8 clients / 1 client: {by[8]['tokens_per_s'] / by[1]['tokens_per_s']:.2f}x aggregate tokens/s")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "levels": rows}, indent=2))


if __name__ == "__main__":
    main()
