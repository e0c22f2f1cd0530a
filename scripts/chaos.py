"""Chaos: streaming clients that disconnect at random, with stop strings, n > 1 and more requests than
rows, against a running server; every client that stays connected must get a whole, well-formed answer.

    python scripts/chaos.py --url http://127.0.0.1:8000 --model NAME [--api-key KEY] [--clients 16] [--seconds 60]

Each client loops until the time is up: a random chat or text completion (streamed or not, n 1-3,
greedy or sampled, a stop string or none, 1-40 tokens), and with probability --disconnect it closes
the connection after a random number of events. A connected client checks its answer: every line an
SSE `data:` event of JSON but the final `[DONE]`, one id throughout, each choice finished exactly
once with "stop" or "length", no error event; a non-streamed answer has its n choices. Afterwards the
server's /v1/debug/engine must show every row free. Exit status 1 on any failure, listing them.

tests/test_server_reliability.py runs it in CI with small bounds, then checks that a greedy answer
equals a fresh server's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import httpx

STOPS = [None, ["e"], [" the", "\n"], ["a"]]
WORDS = ["Hi", "Tell me a story.", "Count to ten.", "What is the capital of France?", "Write a poem about the sea."]


def random_request(rng: random.Random, model: str) -> tuple[str, dict]:
    n = rng.choice([1, 1, 2, 3])
    body = {"model": model, "n": n, "max_tokens": rng.randint(1, 40), "stream": rng.random() < 0.8,
            "temperature": rng.choice([0.0, 1.0]), "seed": rng.randint(0, 1000)}
    if (stop := rng.choice(STOPS)) is not None:
        body["stop"] = stop
    if rng.random() < 0.7:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": rng.choice(WORDS)}]}
    return "/v1/completions", {**body, "prompt": rng.choice(WORDS)}


def check_stream(lines: list[str], n: int) -> str | None:
    """None if the events make a whole, well-formed stream of n choices; else what is wrong."""
    events = [line for line in lines if line]
    if not events or events[-1] != "data: [DONE]":
        return f"the stream does not end with [DONE]: {events[-1:]}"
    finished: dict[int, str] = {}
    ids = set()
    for line in events[:-1]:
        if not line.startswith("data: "):
            return f"not an SSE data line: {line[:80]!r}"
        chunk = json.loads(line[6:])  # strict JSON: NaN or Infinity would fail here too
        if "error" in chunk:
            return f"an error event: {chunk['error']}"
        ids.add(chunk["id"])
        for choice in chunk["choices"]:
            if choice["finish_reason"] is not None:
                if choice["index"] in finished:
                    return f"choice {choice['index']} finished twice"
                finished[choice["index"]] = choice["finish_reason"]
    if len(ids) != 1:
        return f"{len(ids)} ids in one stream"
    if sorted(finished) != list(range(n)) or not set(finished.values()) <= {"stop", "length"}:
        return f"finish reasons {finished} for n={n}"
    return None


async def client(http: httpx.AsyncClient, url: str, model: str, deadline: float, rng: random.Random,
                 disconnect: float, stats: dict, failures: list[str], requests: int | None) -> None:
    while time.monotonic() < deadline and (requests is None or stats["sent"] < requests):
        stats["sent"] += 1
        path, body = random_request(rng, model)
        leave_after = rng.randint(1, 12) if rng.random() < disconnect else None
        try:
            if not body["stream"]:
                r = await http.post(url + path, json=body)
                if r.status_code != 200 or len(r.json()["choices"]) != body["n"]:
                    failures.append(f"{path} {body}: {r.status_code} {r.text[:200]}")
                stats["complete"] += 1
                continue
            async with http.stream("POST", url + path, json=body) as r:
                if r.status_code != 200:
                    failures.append(f"{path} {body}: {r.status_code} {(await r.aread())[:200]!r}")
                    continue
                lines = []
                async for line in r.aiter_lines():
                    lines.append(line)
                    if leave_after is not None and sum(1 for x in lines if x) >= leave_after:
                        break  # leaving the block closes the connection mid-stream
            if leave_after is not None and lines[-1:] != ["data: [DONE]"]:
                stats["disconnected"] += 1
                continue
            problem = check_stream(lines, body["n"])
            if problem:
                failures.append(f"{path} {body}: {problem}")
            stats["complete"] += 1
        except httpx.HTTPError as e:
            failures.append(f"{path} {body}: {type(e).__name__}: {e}")


async def chaos(url: str, model: str, api_key: str | None = None, clients: int = 16, seconds: float = 60.0,
                disconnect: float = 0.3, seed: int = 0, requests: int | None = None,
                stats: dict | None = None) -> tuple[dict, list[str]]:
    """Run the clients for `seconds` (or until `requests` are sent); the counts of requests sent,
    complete and abandoned (in `stats`, updated as they go, if given), and the failures."""
    stats = stats if stats is not None else {}
    stats.update(sent=0, complete=0, disconnected=0)
    failures: list[str] = []
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(timeout=120, headers=headers, limits=limits) as http:
        await asyncio.gather(*(client(http, url, model, deadline, random.Random(seed * 1000 + k), disconnect,
                                      stats, failures, requests) for k in range(clients)))
        # Abandoned rows are freed at the engine's next step: give it a moment.
        for _ in range(200):
            state = (await http.get(url + "/v1/debug/engine")).json()
            if state["running"] == 0 and state["waiting"] == 0 and state["free_rows"] == state["max_batch"]:
                break
            await asyncio.sleep(0.05)
        else:
            failures.append(f"rows still busy after the run: {state}")
    return stats, failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the server's root, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=None)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--disconnect", type=float, default=0.3, help="probability that a request is abandoned")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    stats, failures = asyncio.run(chaos(a.url.rstrip("/"), a.model, a.api_key, a.clients, a.seconds, a.disconnect, a.seed))
    print(f"{stats['complete']} complete, {stats['disconnected']} abandoned, {len(failures)} failed")
    for failure in failures[:20]:
        print("  " + failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
