"""Compile every kernel for an NVIDIA GPU on a machine that has none, at a model's real shapes.

    python -m kernels.compile_check [--arch 90] [--shapes dim,n_heads,n_kv_heads,head_dim,hidden_dim]

The interpreter runs the kernels' arithmetic but never the compiler, so what only the GPU backend
checks goes unseen on CPU: tl.dot's minimum of 16 per dimension, types that must agree across the
branches of a runtime `if`, shared memory against the chip's limit. Here each wrapper runs on CPU
tensors while triton believes it drives a GPU of the given architecture: every launch is compiled
through ptxas to a cubin and never run. Prints registers, spills and shared memory per kernel; exits 1
if a kernel fails to compile or needs more shared memory than the chip has.

Must run without TRITON_INTERPRET (it is removed from the environment before triton is imported).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

from . import _common, decode_attention, paged_decode_attention, prefill_attention, quant_matmul, rmsnorm, rope, swiglu  # noqa: E402

MODULES = (rmsnorm, rope, swiglu, decode_attention, paged_decode_attention, prefill_attention, quant_matmul)
MISTRAL_7B = "4096,32,8,128,14336"  # dim, n_heads, n_kv_heads, head_dim, hidden_dim of Mistral-7B-v0.3
SHARED_LIMIT = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory per block


class _CompileOnlyDriver:
    """Just enough of a triton driver to compile for `target`; nothing is ever launched."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _compile_launches(compiled: list) -> None:
    """Turn every `kernel[grid](...)` of our modules into a compile-only warmup."""
    for module in MODULES:
        for value in vars(module).values():
            if isinstance(value, triton.runtime.JITFunction):
                def run(*args, grid, warmup, _fn=value, **kwargs):
                    kernel = type(_fn).run(_fn, *args, grid=grid, warmup=True, **kwargs)
                    compiled.append((_fn.__name__, kwargs, kernel))
                    return kernel

                value.run = run


def _cases(shapes: str, dtype: torch.dtype):
    """(name, thunk) for each wrapper call at the model's shapes."""
    dim, H, Hkv, D, hidden_dim = map(int, shapes.split(","))

    def t(*shape, dt=dtype):
        return torch.zeros(shape, dtype=dt)

    pos = torch.zeros(1, dtype=torch.long)
    x, w = t(1, 7, dim), t(dim)
    freqs = t(1, 7, D // 2, dt=torch.float32)
    cache = t(1, Hkv, 4096, D)
    yield "rms_norm", lambda: rmsnorm.rms_norm(x, w, 1e-5)
    yield "add_rms_norm", lambda: rmsnorm.add_rms_norm(x, x, w, 1e-5)
    yield "apply_rotary_emb", lambda: rope.apply_rotary_emb(t(1, 7, H, D), t(1, 7, Hkv, D), freqs, freqs)
    yield "silu_mul", lambda: swiglu.silu_mul(t(1, 7, hidden_dim), t(1, 7, hidden_dim))
    for M in (1, quant_matmul.MAX_ROWS):  # the projections' shapes; the output head's is one more [V, dim]
        for K, N in ((dim, hidden_dim), (hidden_dim, dim)):
            yield f"int8_matmul M={M} K={K} N={N}", lambda M=M, K=K, N=N: quant_matmul.int8_matmul(
                t(M, K), t(N, K, dt=torch.int8), t(N))
            for group in (32, 128):
                yield f"int4_matmul M={M} K={K} N={N} group={group}", lambda M=M, K=K, N=N, g=group: (
                    quant_matmul.int4_matmul(t(M, K), t(N, K // 2, dt=torch.uint8), t(N, K // g), g))
    for window in (None, 4096):
        for splits in (1, 16):
            yield f"decode_attention splits={splits} window={window}", lambda s=splits, w=window: (
                decode_attention.decode_attention(t(1, 1, H, D), cache, cache, pos, w, num_splits=s))
        pool, table = t(257, 16, Hkv, D), torch.zeros(1, 256, dtype=torch.int32)  # 4096 positions in blocks of 16
        for splits in (1, 16):
            yield f"paged_decode_attention splits={splits} window={window}", lambda s=splits, w=window: (
                paged_decode_attention.paged_decode_attention(t(1, 1, H, D), pool, pool, table, pos, w, num_splits=s))
        for T in (7, 512):
            yield f"prefill_attention T={T} window={window}", lambda T=T, w=window: (
                prefill_attention.prefill_attention(t(1, T, H, D), cache[:, :, :512], cache[:, :, :512], pos, w))


def _resource_usage(cubin: bytes) -> str:
    """Registers and local memory (spills) per thread, as the bundled cuobjdump reads them from the cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        except OSError:
            return "registers unknown (no cuobjdump)"
    regs, local = re.search(r"REG:(\d+)", res), re.search(r"LOCAL:(\d+)", res)
    return f"{regs.group(1) if regs else '?'} regs, {local.group(1) if local else '?'} B local (spills)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 80 (A100), 89 (L4), 90 (H100)")
    p.add_argument("--shapes", default=MISTRAL_7B, help="the model's dim,n_heads,n_kv_heads,head_dim,hidden_dim "
                   "(default: Mistral-7B-v0.3's)")
    p.add_argument("--dtypes", default="bfloat16,float32")
    a = p.parse_args(argv)

    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", a.arch, 32)))
    _common.INTERPRET = True  # let the wrappers take CPU tensors: nothing they launch will run
    compiled: list = []
    _compile_launches(compiled)
    failed = 0
    for dtype in [getattr(torch, name) for name in a.dtypes.split(",")]:
        for name, call in _cases(a.shapes, dtype):
            compiled.clear()
            try:
                call()
            except Exception as e:  # a compile error: report it, go on with the others
                failed += 1
                print(f"FAIL  {name} {dtype}: {type(e).__name__}: {str(e).strip().splitlines()[-1][:300]}")
                continue
            for kernel_name, kwargs, kernel in compiled:
                shared = kernel.metadata.shared
                too_big = shared > SHARED_LIMIT.get(a.arch, 101376)
                failed += too_big
                print(f"{'FAIL' if too_big else 'ok'}    {name} {str(dtype)[6:]}: {kernel_name} warps={kernel.metadata.num_warps} "
                      f"stages={kernel.metadata.num_stages} shared={shared} B, {_resource_usage(kernel.asm['cubin'])}")
    print(f"{failed} failure(s) compiling for sm_{a.arch} with triton {triton.__version__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
