"""What a tensor-parallel decode step spends in collectives: each of them timed alone, at the shapes
of a batch-1 step. Every rank must call `step_collectives` together (each timing is a collective);
`mistral bench` under torchrun and scripts/bench_tp.py report rank 0's figures.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

from ..args import ModelArgs
from ..tp_replay import HEADER
from .timing import sync


def median_time(fn: Callable[[], object], calls: int, warmup: int = 10, device: torch.device | str = "cpu") -> float:
    """Seconds of one call of fn, the median of `calls` (a collective's time varies with the other
    ranks' arrival: the median is a typical step's, the best an unusually lucky one)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_collectives(args: ModelArgs, shard, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                     calls: int = 200) -> dict[str, float]:
    """Seconds of each collective a batch-1 decode step of the model `args` split over `shard.world`
    ranks makes: an all-reduce of [1, 1, dim] (2 per layer), the all-gather of the logits' slices
    [1, 1, vocab / N], and rank 0's two announcements (tp_replay.py: the 9-int64 header on the
    control group, the step's token and position); "per_step" is their sum over one step."""
    x = torch.randn(1, 1, args.dim, device=device).to(dtype)
    part = torch.randn(1, 1, args.vocab_size // shard.world, device=device).to(dtype)
    parts = [torch.empty_like(part) for _ in range(shard.world)]
    header = torch.zeros(HEADER, dtype=torch.long)  # on the CPU: the control group is gloo
    payload = torch.zeros(2, dtype=torch.long, device=device)
    t = {
        "all_reduce": median_time(lambda: dist.all_reduce(x, group=shard.group), calls, device=device),
        "all_gather": median_time(lambda: dist.all_gather(parts, part, group=shard.group), calls, device=device),
        "header": median_time(lambda: dist.broadcast(header, 0, group=shard.control), calls),
        "payload": median_time(lambda: dist.broadcast(payload, 0, group=shard.group), calls, device=device),
    }
    t["per_step"] = 2 * args.n_layers * t["all_reduce"] + t["all_gather"] + t["header"] + t["payload"]
    dist.barrier(group=shard.control)  # every rank done timing before any goes on
    return t
