"""The backends of the model's primitive operations: which function computes each entry of its
`Ops` table (mistral/model.py), chosen by name with `get_ops`.

    "torch"   PyTorch's own operators (no custom kernels): model.py's reference definitions, with two
              measures for the CPU swapped in below; each computes the same product, only faster
    "cpu"     "torch", with the decode rows' fp32/bf16 mat-vecs and attention in the hand-written C++
              kernels of `kernels.cpu` (built on first use by the system C++ compiler); the loader
              also gives them a quantized model's int8/int4 layers (quantize.use_cpu_kernels)
    "triton"  the fused kernels of this project's top-level `kernels` package (for CUDA GPUs; on a CPU
              they run under Triton's interpreter, for the tests)
    "auto"    "triton" on a CUDA device; on a CPU "cpu" where its kernels build, else "torch"

The measures depend on shapes, dtypes, the device, the thread count and whether torch.compile is
tracing, never on values: within a run, a given product always takes the same path.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn.functional as F

from .kv_cache import Pages, per_sequence
from .model import TORCH_OPS, Ops
from .model import attention as reference_attention

log = logging.getLogger(__name__)

def cpu_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ. On a CPU, a product of a few rows (a decode step) splits the weight's rows into
    blocks and runs them as one batched matmul.

    Eager, in fp32: one block per thread. PyTorch computes a [1, K] x [K, N] fp32 product on a
    single thread, which on a 2-core machine reads the weights at ~15 GB/s; two blocks read ~24 GB/s.
    (In bf16 it already uses every core, through oneDNN, at 15-18 GB/s.)
    Under torch.compile (the engine's `compile=True`), in any dtype: inductor turns a batched matmul
    this small into one fused, vectorised reduction over all threads, which reads fp32 and bf16
    weights alike at 28-31 GB/s on that machine, where its `F.linear` (an external GEMM call) reads
    7-18 GB/s. Two blocks are as fast as or faster than one on every shape of the 0.5B model."""
    if x.device.type == "cpu" and x.numel() <= 4 * x.shape[-1] and weight.is_contiguous():
        if torch.compiler.is_compiling():
            blocks = 2
        else:
            blocks = torch.get_num_threads() if x.dtype == torch.float32 else 1
        if blocks > 1 and weight.shape[0] % blocks == 0:
            x_blocks = x.reshape(1, -1, x.shape[-1]).expand(blocks, -1, -1)  # [blocks, M, K]
            out = torch.bmm(x_blocks, weight.view(blocks, -1, weight.shape[1]).transpose(1, 2))  # [blocks, M, N / blocks]
            return out.transpose(0, 1).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def cpu_attention(xq, keys, values, input_pos, sliding_window):
    """model.attention, in fp32 on a CPU for bf16/fp16 inputs: PyTorch's CPU attention kernel is several
    times slower in those dtypes than in fp32 on CPUs without AMX (5x for a 0.5B model's decode step).
    Q, K and V of a step are small next to the weights, so attending in fp32 and rounding the output
    once is faster, and as exact."""
    if xq.device.type == "cpu" and xq.dtype != torch.float32:
        out = reference_attention(xq.float(), keys.float(), values.float(), input_pos, sliding_window)
        return out.type_as(xq)
    return reference_attention(xq, keys, values, input_pos, sliding_window)


# Both tables' attention also takes a packed view's keys (kv_cache.PackedView: the engine's mixed steps).
PYTORCH_OPS = dataclasses.replace(TORCH_OPS, linear=cpu_linear, attention=per_sequence(cpu_attention))


def cpu_kernel_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ; eager, a product of a few rows in fp32 or bf16 goes to kernels.cpu.matvec, which
    streams the weight once over all threads, each row on its own (a row's bits do not depend on its
    batch). Under torch.compile `cpu_linear`'s fused reductions stay: in a 0.5B compiled decode step
    they were faster (fp32 14.7 vs 13.1 tok/s, bf16 22.7 vs 21.4, one A/B; BENCHMARKS.md)."""
    if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.numel() <= 4 * x.shape[-1]
            and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16) and weight.is_contiguous()):
        from kernels.cpu import matvec

        return matvec(x.contiguous(), weight)
    return cpu_linear(x, weight)


def cpu_kernel_attention(xq, keys, values, input_pos, sliding_window):
    """model.attention; a decode step's few new tokens (T <= 4) in fp32 or bf16 go to
    kernels.cpu.decode_attention, which computes the same softmax in fp32 reading each cached key and
    value row once for the query heads that share it: 10.8 against SDPA's 36.8 us a layer at 48
    cached positions, 25.7 against 53.6 at 160 (BENCHMARKS.md). Keys and values may be `Pages` of
    the engine's paged cache (`reads_pages` below), which it reads through the block table where they
    lie; a row reads only up to its own position, so the step does not depend on the cache length it
    is given. Longer inputs (prefill) keep `cpu_attention`, over gathered pages."""
    floats = (torch.float32, torch.bfloat16)
    paged = isinstance(keys, Pages)
    k, v, table = (keys.pool, values.pool, keys.block_table) if paged else (keys, values, None)
    if xq.device.type == "cpu" and xq.shape[1] <= 4 and xq.dtype in floats and k.dtype in floats:
        from kernels.cpu import decode_attention

        pos = input_pos.expand(xq.shape[0]).contiguous()  # [B]; one position may serve every row
        return decode_attention(xq.contiguous(), k, v, pos, sliding_window or 0, table)
    if paged:
        keys, values = keys.gather(), values.gather()
    return cpu_attention(xq, keys, values, input_pos, sliding_window)


CPU_OPS = dataclasses.replace(PYTORCH_OPS, name="cpu", linear=cpu_kernel_linear,
                              attention=per_sequence(cpu_kernel_attention, reads_pages=True))


def cpu_kernels_error() -> str | None:
    """None when kernels.cpu builds and loads here, else why not (one line)."""
    from kernels.cpu import Unavailable, load

    try:
        load()
    except Unavailable as e:
        return str(e)
    return None

KERNELS = ("torch", "cpu", "triton", "auto")  # the backends' names, as `kernels=` and --kernels take them


def get_ops(kernels: str | Ops, device: torch.device | str | None = None) -> Ops:
    """The table for `kernels` (one of KERNELS; an `Ops` is returned as it is) on `device`."""
    if isinstance(kernels, Ops):
        return kernels
    device = torch.device(device if device is not None else "cpu")
    if kernels == "auto" and device.type == "cuda":
        kernels = "triton"
    elif kernels == "auto":
        error = cpu_kernels_error()
        if error is not None:
            log.warning("%s; the CPU runs PyTorch's own operators (kernels='torch'), slower", error)
        kernels = "torch" if error else "cpu"
    if kernels == "torch":
        return PYTORCH_OPS
    if kernels == "cpu":
        if device.type != "cpu":
            raise ValueError(f"kernels='cpu' is for the CPU, not {device}")
        error = cpu_kernels_error()
        if error is not None:
            raise ValueError(f"kernels='cpu': {error}")
        return CPU_OPS
    if kernels == "triton":
        return triton_ops()
    names = ", ".join(map(repr, KERNELS[:-1])) + f" or {KERNELS[-1]!r}"
    raise ValueError(f"kernels must be {names}, got {kernels!r}")


_TRITON_OPS: Ops | None = None


def triton_ops() -> Ops:
    """The fused Triton kernels as an `Ops` table (imports triton on first use)."""
    global _TRITON_OPS
    if _TRITON_OPS is None:
        kernels = _project_kernels()
        _TRITON_OPS = Ops("triton", F.linear, kernels.rms_norm, kernels.add_rms_norm, kernels.apply_rotary_emb,
                          per_sequence(triton_attention, reads_pages=True), kernels.silu_mul)
    return _TRITON_OPS


def triton_attention(xq, keys, values, input_pos, sliding_window):
    """model.attention by the Triton kernels (kernels.attention). Keys and values may be `Pages` of the
    engine's paged cache: one new token a row reads them through the block table where they lie
    (kernels.paged_decode_attention), so a decode step, and a CUDA graph replaying one over the whole
    cache, costs the rows' own positions rather than a gathered copy of every row's table; prompt
    chunks attend over gathered pages."""
    kernels = _project_kernels()
    if isinstance(keys, Pages):
        if xq.shape[1] == 1:
            from kernels.paged_decode_attention import paged_decode_attention

            return paged_decode_attention(xq, keys.pool, values.pool, keys.block_table,
                                          input_pos.expand(xq.shape[0]), sliding_window)
        keys, values = keys.gather(), values.gather()
    return kernels.attention(xq, keys, values, input_pos, sliding_window)


def _project_kernels():
    """This project's top-level `kernels` package, refusing a different one of that name: `kernels` is
    also an unrelated PyPI distribution (Hugging Face's kernel hub), and if it shadowed ours on sys.path
    we would silently run someone else's code."""
    import kernels

    if not getattr(kernels, "MISTRAL_FROM_SCRATCH", False):
        raise ImportError(
            f"the 'kernels' package imported from {getattr(kernels, '__file__', '?')} is not this project's "
            "(the PyPI distribution 'kernels' may be shadowing it); uninstall it or fix sys.path"
        )
    return kernels
