"""How every benchmark here times and counts: `mistral bench` and the scripts in scripts/ share these.

    best_time            seconds of one call, the best of several (the device synchronized around it)
    copy_bandwidth       bytes/s of a large device-to-device copy: the memory's ceiling
    matmul_rate          FLOP/s of a large square matrix product: the arithmetic's ceiling
    matvec_bandwidth     bytes/s of a CPU decode step's mat-vecs over a model's own matrices: the CPU floor
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


def matvec_bandwidth(model, passes: int = 5, min_bytes: int = 256 * 2**20) -> dict[str, float]:
    """Bytes/s of a mat-vec `x [1, K] @ W [N, K]ᵀ` over the model's own matrices, in the model's order,
    from main memory: a decode step reduced to its matrix-vector products. Best of `passes`, for
    each of three ways to compute it: "F.linear"; "linear", the eager CPU `linear` of mistral/ops.py (in fp32, one
    block of rows per thread); "compiled", that `linear` under torch.compile, as the engine's
    `compile=True` runs it, with the whole pass as one compiled call (so that no per-call cost
    counts); "kernels.cpu", the hand-written mat-vec of the "cpu" backend, where it builds. The
    floor is set by the fastest of them: the fastest mat-vec we know here.

    When the model is smaller than `min_bytes` (8x this machine's 32 MiB L3), the pass runs over
    enough copies of its matrices to reach it, so that no weight is still in a cache when it is
    read again. (The small model itself, 38 MB in fp32 and 19 MB in bf16, stays partly or wholly in
    the L3 between real steps, so its decode may beat this floor.)
    """
    import torch.nn.functional as F

    from ..ops import cpu_kernel_linear, cpu_kernels_error, cpu_linear

    own = [p for name, p in model.named_parameters() if p.dim() == 2 and name != "tok_embeddings.weight"]
    size = sum(W.numel() * W.element_size() for W in own)
    copies = -(-min_bytes // size)
    matrices = own + [W.clone() for _ in range(copies - 1) for W in own]
    # One input vector per matrix, as in the model: a vector shared by many matrices would let the
    # compiled pass fuse their reductions into one loop over many weight streams at once, which
    # reads memory more slowly than one stream per loop.
    xs = [torch.randn(1, W.shape[1], dtype=W.dtype) for W in matrices]

    def one_by_one(matvec):
        def run():
            for x, W in zip(xs, matrices):
                matvec(x, W)
        return run

    def all_matrices(xs, matrices):
        return [cpu_linear(x, W) for x, W in zip(xs, matrices)]

    compiled = torch.compile(all_matrices, fullgraph=True, dynamic=False)  # static shapes for every model
    ways = {"F.linear": one_by_one(F.linear), "linear": one_by_one(cpu_linear),
            "compiled": lambda: compiled(xs, matrices)}
    if cpu_kernels_error() is None:
        ways["kernels.cpu"] = one_by_one(cpu_kernel_linear)
    with torch.inference_mode():  # one pass more than `passes`: the first is a warm-up (and the compilation)
        return {name: copies * size / best_time(run, "cpu", passes + 1) for name, run in ways.items()}


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
