"""The paged KV cache's serving benchmarks, each side by side with its peer in one run.

    python scripts/bench_paged.py [--preset small] [--peer /work/main] [--only multiturn,stall,levels]

multiturn  C clients, each a conversation of --turns turns (a ~1,000-token system prompt shared by all,
           ~30-token user messages, 32-token answers fed back as the assistant's turns): TTFT p50/p99 of
           the first turn and of the later ones, and tokens/s, prefix caching on vs --no-prefix-caching.
           Again without a system prompt, the ~1,000 tokens as the first user message: in the v3 chat
           format the system prompt moves to the last user message at every turn, so only this variant
           lets a turn reuse the previous ones.
stall      4 streaming clients; an 8,000-token prompt arrives while they stream. Their median
           inter-token gap without it, and the p99 (and max) gap while it is read, with
           --prefill-chunk 512 vs one prefill (--prefill-chunk larger than the prompt), or --chunks;
           with --peer, each chunk size on the peer checkout too, right after this one's; with
           --compile, the servers compile their decode steps (and this checkout its prompt chunks); with
           --decay, this checkout's servers shrink late chunks (--prefill-chunk-decay).
mixed      the engine alone, in this process: 4 streams decoding while an 8,000-token prompt is read in
           --chunks chunks, each with mixed steps (the chunk in the streams' decode forward) and
           without, the two engines stepped in turn: decode-only step median, and median and p99 step
           while the prompt is read, in ms.
levels     bench_server.py's 1/8/32 clients, this checkout vs --peer (another checkout, e.g. main).

Each server is started from its checkout's directory, so it imports that checkout's `mistral`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_server import level, sse_chunks, start_server  # noqa: E402

HERE = Path(__file__).resolve().parent.parent
SYSTEM = " ".join(f"Rule {i}: answer briefly, cite the source, and keep a friendly tone." for i in range(60))  # ~1,000 tokens


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


async def chat(http, url, a, messages, max_tokens=32) -> tuple[float, list[float], str, int]:
    """(TTFT, token arrival times, answer text, cached tokens) of one streamed chat completion."""
    body = {"model": a.model, "messages": messages, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, text, cached = [], "", 0
    async for chunk in sse_chunks(http, f"{url}/v1/chat/completions", body):
        if chunk.get("usage"):
            cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
            text += chunk["choices"][0]["delta"]["content"]
    return (times[0] - start if times else float("nan")), times, text, cached


def client(url, a):
    return httpx.AsyncClient(headers={"Authorization": f"Bearer {a.api_key}"}, timeout=None,
                             limits=httpx.Limits(max_connections=64))


async def multiturn(url, a, system: bool) -> dict:
    async with client(url, a) as http:
        async def conversation(c):
            messages = [{"role": "system", "content": SYSTEM}] if system else []
            firsts, laters, tokens, cached = [], [], 0, 0
            for t in range(a.turns):
                user = f"Client {c}, question {t}: what is the weather like in town number {c * 10 + t}?"
                if not system and t == 0:
                    user = SYSTEM + "\n\n" + user
                messages.append({"role": "user", "content": user})
                ttft, times, text, hit = await chat(http, url, a, messages)
                (firsts if t == 0 else laters).append(ttft)
                tokens += len(times)
                cached += hit
                messages.append({"role": "assistant", "content": text})
            return firsts, laters, tokens, cached

        start = time.perf_counter()
        results = await asyncio.gather(*(conversation(c) for c in range(a.conversations)))
        wall = time.perf_counter() - start
    firsts = [x for r in results for x in r[0]]
    laters = [x for r in results for x in r[1]]
    return {"first_p50": p(firsts, 0.5), "first_p99": p(firsts, 0.99), "later_p50": p(laters, 0.5),
            "later_p99": p(laters, 0.99), "tokens_per_s": sum(r[2] for r in results) / wall,
            "cached": sum(r[3] for r in results)}


async def stall(url, a) -> dict:
    async with client(url, a) as http:
        gaps_before, gaps_during = [], []
        arrived = {}

        done = asyncio.Event()

        async def stream(k):
            # Streams until the long prompt's first token is out (then the client goes away, which
            # cancels the request), so that they span its whole prefill however fast they decode.
            body = {"model": a.model, "messages": [{"role": "user", "content": f"Stream {k}: count slowly."}],
                    "max_tokens": 8000, "ignore_eos": True, "temperature": 0, "stream": True}
            times = []
            async with contextlib.aclosing(sse_chunks(http, f"{url}/v1/chat/completions", body)) as chunks:
                async for chunk in chunks:
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        times.append(time.perf_counter())
                    if done.is_set():
                        break
            return times

        async def long():
            await asyncio.sleep(a.stall_after)
            arrived["sent"] = time.perf_counter()
            long_prompt = "The coast has light rain in the morning and sun later. " * 615  # ~8,000 tokens
            ttft, *_ = await chat(http, url, a, [{"role": "user", "content": long_prompt}], 1)
            arrived["first"] = arrived["sent"] + ttft
            done.set()

        *streams, _ = await asyncio.gather(*(stream(k) for k in range(4)), long())
    sent, first = arrived["sent"], arrived["first"]
    for times in streams:
        for t0, t1 in zip(times, times[1:]):
            (gaps_during if t1 > sent and t0 < first else gaps_before if t1 <= sent else []).append(t1 - t0)
    return {"median_gap": statistics.median(gaps_before), "p99_gap_during": p(gaps_during, 0.99),
            "max_gap_during": max(gaps_during), "long_ttft": first - sent}


def mixed_steps(weights, a, chunk: int) -> dict[bool, tuple[float, float]]:
    """{mixed: (decode-only step median, median and p99 step while the long prompt is read)} in ms, two
    engines stepped in turn."""
    import torch

    from mistral.engine import Engine, GenerationParams
    from mistral.loader import load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    model = load_model(weights, device="cpu", kernels="torch", max_seq_len=8704, quiet=True)
    engines = {mixed: Engine(model, max_batch=8, max_seq_len=8704, fixed_batch_shape=True, prefill_chunk=chunk,
                             mixed_prefill=mixed) for mixed in (True, False)}
    for engine in engines.values():
        for k in range(4):
            engine.add([1, 5 + k, 7, 9], GenerationParams(max_tokens=8000, temperature=0, ignore_eos=True), lambda ev: None)
        for _ in range(10):
            engine.step()

    def timed(engine, into):
        start = time.perf_counter()
        engine.step()
        into.append(time.perf_counter() - start)

    before, during = {m: [] for m in engines}, {m: [] for m in engines}
    for _ in range(50):
        for m, engine in engines.items():
            timed(engine, before[m])
    long_prompt = [1] + [100 + i % 500 for i in range(8000)]
    for engine in engines.values():
        engine.add(long_prompt, GenerationParams(max_tokens=1, temperature=0), lambda ev: None)
    while any(e.prefilling or e.waiting for e in engines.values()):
        for m, engine in engines.items():
            if engine.prefilling or engine.waiting:
                timed(engine, during[m])
    return {m: (1000 * statistics.median(before[m]), 1000 * statistics.median(during[m]), 1000 * p(during[m], 0.99))
            for m in engines}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--peer", type=Path, default=None, help="another checkout to compare the 1/8/32 levels with")
    ap.add_argument("--only", default="multiturn,stall,mixed,levels")
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--stall-after", type=float, default=3.0, help="seconds of streaming before the long prompt")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunks", default="512,100000", help="stall: the --prefill-chunk values to compare (>= 8704: one prefill)")
    ap.add_argument("--decay", type=int, default=None,
                    help="stall: this checkout's servers with --prefill-chunk-decay DECAY (not the peer's)")
    ap.add_argument("--compile", action="store_true",
                    help="stall: serve with --compile (compiled decode steps, and here compiled prompt chunks)")
    a = ap.parse_args()
    a.model, a.api_key, a.kernels, a.device, a.dtype = "bench", "sk-bench", "torch", "cpu", None
    only = set(a.only.split(","))
    out = []

    def serve(weights, extra=(), cwd=None, max_batch=8, max_seq_len=2048):
        a.max_batch, a.max_seq_len = max_batch, max_seq_len
        return start_server(weights, a, cwd=cwd, extra=tuple(extra))

    with tempfile.TemporaryDirectory() as tmp:
        from mistral.args import preset
        from mistral.make_random import make_random

        weights = make_random(Path(tmp) / a.preset, preset(a.preset), "consolidated", "float32")
        if "multiturn" in only:
            out.append("| system prompt | prefix caching | turn 1 TTFT p50 / p99 (s) | later turns TTFT p50 / p99 (s) | tokens/s | cached tokens |")
            out.append("|---|---|---|---|---|---|")
            for system in (True, False):
                for extra in ((), ("--no-prefix-caching",)):
                    process, url = serve(weights, extra)
                    try:
                        asyncio.run(multiturn(url, argparse.Namespace(**{**vars(a), "conversations": 1, "turns": 1}), system))  # warm-up
                        r = asyncio.run(multiturn(url, a, system))
                    finally:
                        process.terminate()
                        process.wait(timeout=30)
                    out.append(f"| {'shared, ~1,000 tokens' if system else 'none (~1,000 tokens in turn 1)'} | "
                               f"{'off' if extra else 'on'} | {r['first_p50']:.3f} / {r['first_p99']:.3f} | "
                               f"{r['later_p50']:.3f} / {r['later_p99']:.3f} | {r['tokens_per_s']:.1f} | {r['cached']} |")
                    print(out[-1], flush=True)
        if "stall" in only:
            out.append("| checkout | prefill | streams' median gap (s) | p99 gap while the 8k prompt is read (s) | max gap (s) | p99 / median | 8k prompt TTFT (s) |")
            out.append("|---|---|---|---|---|---|---|")
            for chunk in a.chunks.split(","):
                label = "one prefill" if int(chunk) >= 8704 else f"chunks of {chunk}"
                decayed = f", decay {a.decay}" if a.decay else ""
                for name, cwd in (("this", HERE), ("peer", a.peer)):
                    if cwd is None:
                        continue
                    extra = ("--prefill-chunk", chunk, *(("--compile",) if a.compile else ()),
                             *(("--prefill-chunk-decay", str(a.decay)) if a.decay and name == "this" else ()))
                    process, url = serve(weights, extra, cwd, max_batch=8, max_seq_len=8704)
                    try:
                        r = asyncio.run(stall(url, a))
                    finally:
                        process.terminate()
                        process.wait(timeout=30)
                    out.append(f"| {name} ({cwd}) | {label}{decayed if name == 'this' else ''} | {r['median_gap']:.4f} | {r['p99_gap_during']:.4f} | "
                               f"{r['max_gap_during']:.4f} | {r['p99_gap_during'] / r['median_gap']:.1f}x | {r['long_ttft']:.2f} |")
                    print(out[-1], flush=True)
        if "mixed" in only:
            out.append("| prefill | mixed steps | decode-only step median (ms) | step median / p99 while the 8k prompt is read (ms) | p99 / decode-only median |")
            out.append("|---|---|---|---|---|")
            for chunk in a.chunks.split(","):
                for mixed, r in mixed_steps(weights, a, int(chunk)).items():
                    out.append(f"| chunks of {chunk} | {'on' if mixed else 'off'} | {r[0]:.2f} | {r[1]:.2f} / {r[2]:.2f} | {r[2] / r[0]:.1f}x |")
                    print(out[-1], flush=True)
        if "levels" in only:
            out.append("| checkout | clients | tokens/s | TTFT p50 (s) | TTFT max (s) |")
            out.append("|---|---|---|---|---|")
            a.requests, a.max_tokens, a.temperature = 3, 64, 0.0
            for name, cwd in (("this", HERE), ("peer", a.peer)):
                if cwd is None:
                    continue
                process, url = serve(weights, (), cwd, max_batch=32, max_seq_len=256)
                try:
                    asyncio.run(level(url, a, 1))
                    for c in (1, 8, 32):
                        r = asyncio.run(level(url, a, c))
                        out.append(f"| {name} ({cwd}) | {c} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.3f} | {r['ttft_max_s']:.3f} |")
                        print(out[-1], flush=True)
                finally:
                    process.terminate()
                    process.wait(timeout=30)
    print(f"\n# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}; preset {a.preset}")
    print("\n".join(out))


if __name__ == "__main__":
    main()
