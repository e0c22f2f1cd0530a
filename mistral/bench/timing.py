"""How every benchmark here times and counts: `mistral bench` and the scripts in scripts/ share these.

    best_time            seconds of one call, the best of several (the device synchronized around it)
    copy_bandwidth       bytes/s of a large device-to-device copy: the memory's ceiling
    matmul_rate          FLOP/s of a large square matrix product: the arithmetic's ceiling
    weight_bytes_per_token  what a decode step at batch 1 reads of the weights
    stamp_tokens         run one greedy request through an `Engine`, timestamping every token
    decode_rates         tokens/s of such runs: the best run, and 1 / the median gap between tokens
    cpu_name, load_average  what the machine was and how busy, for the line above a table

Each returns a number (or a list of them) and prints nothing.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device | str, runs: int,
              setup: Callable[[], object] | None = None) -> float:
    """Seconds of one call of fn, the best of `runs` (each after `setup`, untimed)."""
    best = math.inf
    for _ in range(runs):
        if setup is not None:
            setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device | str, quick: bool = False) -> float:
    """Bytes/s of a large device-to-device copy (1 GiB on a GPU, 128 MiB on a CPU), counting bytes
    read and bytes written."""
    n = 2**30 if torch.device(device).type == "cuda" else 2**27
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()  # not zeros: a fair input
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = best_time(lambda: [dst.copy_(src) for _ in range(5)], device, 3 if quick else 10) / 5
    return 2 * n / seconds


def matmul_rate(device: torch.device | str, dtype: torch.dtype, quick: bool = False) -> float:
    """FLOP/s of a large square matrix product (8192³ on a GPU, 1024³ on a CPU)."""
    n = 8192 if torch.device(device).type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    seconds = best_time(lambda: [a @ b for _ in range(5)], device, 3 if quick else 10) / 5
    return 2 * n**3 / seconds


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step at batch 1 reads: every stored tensor (quantized ones
    included) but the embedding table, of which a step reads one row."""
    return sum(t.numel() * t.element_size() for name, t in model.state_dict().items() if name != "tok_embeddings.weight")


def stamp_tokens(engine, prompt: list[int], max_tokens: int, ignore_eos: bool = True) -> list[tuple[float, int]]:
    """(perf_counter time, token id) of every token of one greedy request through `engine`,
    run to completion on this thread (the engine's `run_until_idle`)."""
    from ..engine import GenerationParams, TokenEvent

    stamps: list[tuple[float, int]] = []

    def emit(event) -> None:
        if isinstance(event, TokenEvent):
            stamps.append((time.perf_counter(), event.token))

    engine.add(prompt, GenerationParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos), emit)
    engine.run_until_idle()
    return stamps


def decode_rates(runs: list[list[float]]) -> tuple[float, float]:
    """Tokens/s of the best run (first token to last: the decode phase, prefill left out), and
    1 / the median gap between tokens over all runs: the rate of an undisturbed step, which a busy
    neighbour's bursts barely move. Each run is the list of its tokens' arrival times."""
    best = max((len(t) - 1) / (t[-1] - t[0]) for t in runs)
    return best, 1 / statistics.median(b - a for t in runs for a, b in zip(t, t[1:]))


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (or what `platform` knows elsewhere)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: how busy the machine was around a figure."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise Timeout in the main thread after `seconds` (SIGALRM; a no-op elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise Timeout(f"over its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
