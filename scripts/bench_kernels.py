"""Micro-benchmark of each Triton kernel against its PyTorch reference and `torch.compile` of it, at
Mistral-7B shapes (dim 4096, 32 query heads, 8 KV heads, head_dim 128, hidden 14336), in bf16.

Every op but prefill attention moves many bytes per FLOP, so each is judged by its achieved
bandwidth against what this GPU can do:

  copy GB/s     `dst.copy_(src)` of 1 GiB: 2 GiB moved per copy, best of several (mistral/bench/timing.py). The ceiling.
  bytes         What the op must read and write at least: inputs once, outputs once (for attention:
                the visible keys and values of every row, the queries and the output).
  GB/s, % copy  bytes / time for each implementation.

Prefill attention is bound by arithmetic: it is reported in TFLOP/s (4·D FLOPs per visible
query-key pair: Q·Kᵀ and P·V). Times are `triton.testing.do_bench` medians (the L2 cache is flushed
before each run). The references are mistral/model.py's TORCH_OPS; attention's is SDPA with a
boolean mask over the whole cache view, which is the model's own path.

    python scripts/bench_kernels.py [--quick] [--no-compile]

On a machine without a CUDA GPU it says so and exits 0: the kernels' correctness tests run on the
CPU (pytest tests/test_kernels.py), their speed does not.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

H, HKV, D, DIM, HIDDEN = 32, 8, 128, 4096, 14336  # Mistral-7B
BF16 = torch.bfloat16


def cases(quick: bool):
    """(name, shape label, bytes moved, flops or 0, triton fn, reference fn)."""
    from mistral import model as ref
    from mistral.ops import triton_ops

    ops = triton_ops()
    bf = dict(dtype=BF16, device="cuda")
    for T in (1, 4096) if quick else (1, 16, 512, 4096):
        x, res, w = torch.randn(T, DIM, **bf), torch.randn(T, DIM, **bf), torch.randn(DIM, **bf)
        yield "rms_norm", f"[{T}, {DIM}]", 2 * 2 * T * DIM, 0, lambda x=x, w=w: ops.rms_norm(x, w, 1e-5), \
            lambda x=x, w=w: ref.rms_norm(x, w, 1e-5)
        yield "add_rms_norm", f"[{T}, {DIM}]", 4 * 2 * T * DIM, 0, \
            lambda x=x, r=res, w=w: ops.add_rms_norm(x, r, w, 1e-5), lambda x=x, r=res, w=w: ref.add_rms_norm(x, r, w, 1e-5)
        gate, up = torch.randn(T, HIDDEN, **bf), torch.randn(T, HIDDEN, **bf)
        yield "silu_mul", f"[{T}, {HIDDEN}]", 3 * 2 * T * HIDDEN, 0, \
            lambda g=gate, u=up: ops.silu_mul(g, u), lambda g=gate, u=up: ref.silu_mul(g, u)
        xq, xk = torch.randn(1, T, H, D, **bf), torch.randn(1, T, HKV, D, **bf)
        cos, sin = torch.randn(1, T, D // 2, device="cuda"), torch.randn(1, T, D // 2, device="cuda")
        yield "apply_rotary_emb", f"T={T}", 2 * 2 * T * (H + HKV) * D + 2 * 4 * T * D // 2, 0, \
            lambda q=xq, k=xk, c=cos, s=sin: ops.apply_rotary_emb(q, k, c, s), \
            lambda q=xq, k=xk, c=cos, s=sin: ref.apply_rotary_emb(q, k, c, s)

    for B, L in ((1, 1024), (1, 32768), (8, 4096)) if quick else ((1, 1024), (1, 8192), (1, 32768), (8, 4096), (32, 2048)):
        keys, values = torch.randn(B, HKV, L, D, **bf), torch.randn(B, HKV, L, D, **bf)
        xq = torch.randn(B, 1, H, D, **bf)
        pos = torch.full((B,), L - 1, dtype=torch.long, device="cuda")  # every row sees the whole cache
        nbytes = 2 * 2 * B * HKV * L * D + 2 * 2 * B * H * D
        yield "decode attention", f"B={B} L={L}", nbytes, 0, \
            lambda q=xq, k=keys, v=values, p=pos: ops.attention(q, k, v, p, None), \
            lambda q=xq, k=keys, v=values, p=pos: ref.attention(q, k, v, p, None)

    for T in (512, 4096) if quick else (512, 2048, 4096, 8192):
        keys, values = torch.randn(1, HKV, T, D, **bf), torch.randn(1, HKV, T, D, **bf)
        xq = torch.randn(1, T, H, D, **bf)
        pos = torch.zeros(1, dtype=torch.long, device="cuda")
        flops = 4 * D * H * T * (T + 1) // 2  # causal: T(T+1)/2 visible pairs per head
        yield "prefill attention", f"T={T}", 2 * 2 * T * (H + 2 * HKV) * D, flops, \
            lambda q=xq, k=keys, v=values, p=pos: ops.attention(q, k, v, p, None), \
            lambda q=xq, k=keys, v=values, p=pos: ref.attention(q, k, v, p, None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py measures GPU speed and needs a CUDA GPU; none found, so nothing to measure.\n"
              "The kernels' correctness tests run on this CPU under Triton's interpreter: pytest tests/test_kernels.py")
        return 0

    import triton
    from triton.testing import do_bench

    from mistral.bench.timing import copy_bandwidth

    props = torch.cuda.get_device_properties(0)
    copy = copy_bandwidth("cuda") / 1e9
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}")
    print(f"copy bandwidth: {copy:.0f} GB/s\n")
    print("| op | shape | Triton | PyTorch | torch.compile | Triton vs PyTorch |")
    print("|---|---|---|---|---|---|")
    for name, shape, nbytes, flops, triton_fn, ref_fn in cases(a.quick):
        def rate(fn) -> tuple[str, float]:
            try:
                ms = do_bench(fn)
            except Exception as e:  # e.g. torch.compile unavailable: report, carry on
                return f"failed ({type(e).__name__})", float("nan")
            if flops:
                return f"{ms * 1e3:.0f} µs, {flops / ms / 1e9:.0f} TFLOP/s", ms
            return f"{ms * 1e3:.1f} µs, {nbytes / ms / 1e6:.0f} GB/s ({100 * nbytes / ms / 1e6 / copy:.0f}%)", ms

        ours, t_ours = rate(triton_fn)
        theirs, t_ref = rate(ref_fn)
        compiled = "skipped" if a.no_compile else rate(torch.compile(ref_fn, dynamic=False))[0]
        torch._dynamo.reset()  # one compiled graph per case; keeps recompilation limits out of the way
        print(f"| {name} | {shape} | {ours} | {theirs} | {compiled} | {t_ref / t_ours:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
