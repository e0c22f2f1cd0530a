"""Run by test_tp.py under torchrun: every rank loads its shard of each checkpoint and runs the same
calls (no rank 0 in charge here), then rank 0 writes what they computed to a JSON file.

    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py OUT.json TOKENS FOLDER...
"""

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mistral import tp
from mistral.args import ModelArgs
from mistral.loader import load_model
from mistral.model import Transformer


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def warm_up() -> None:
    """What the first model built and run in a process costs once (meta-device registrations, CPU
    kernels' libraries and buffers: ~150 MiB), with a model too small to leave memory to reuse."""
    tiny = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, hidden_dim=32,
                     norm_eps=1e-5, vocab_size=64, rope_theta=1e6)
    with torch.device("meta"):
        Transformer(tiny)
    with torch.inference_mode():
        Transformer(tiny, max_seq_len=16)(torch.tensor([[1, 2]]))


def main(out: str, tokens: str, *folders: str) -> None:
    shard, device = tp.init(torch.device("cpu"))
    warm_up()
    ids = torch.tensor([[int(t) for t in tokens.split(",")]])
    results = []
    for folder in folders:
        gc.collect()
        before = rss_bytes()
        model = load_model(folder, shard=shard, max_seq_len=64, quiet=True)
        with torch.inference_mode():
            prefill = model(ids)[0]
            cache = model.new_cache(1, ids.shape[1])
            incremental = torch.cat([model(ids[:, t : t + 1], torch.tensor([t]), cache)[0] for t in range(ids.shape[1])])
        gc.collect()
        mine = {"rss_growth": rss_bytes() - before,
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "kv_heads": cache.k[0].shape[1]}
        everyone = [None] * shard.world
        dist.all_gather_object(everyone, mine)
        results.append({"folder": folder, "prefill": prefill.tolist(), "incremental": incremental.tolist(), "ranks": everyone})
        del model, cache
    if shard.rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
