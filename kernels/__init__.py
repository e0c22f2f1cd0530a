"""Triton fused kernels for the Mistral model, one module per operation:

    rmsnorm.py            rms_norm, add_rms_norm (residual add + RMSNorm in one pass)
    rope.py               apply_rotary_emb (queries and keys in one launch)
    swiglu.py             silu_mul (SwiGLU's elementwise gate)
    decode_attention.py   one new token per row: GQA-packed, split-KV, per-row lengths
    paged_decode_attention.py  the same over a paged cache (a pool of blocks and a block table per row)
    prefill_attention.py  many new tokens per row: causal, GQA, flash-style, optional sliding window
    quant_matmul.py       int8 / int4 weight-only matmul for a few rows (mistral/quantize.py uses it on CUDA)

    compile_check.py      compiles all of them for a GPU architecture on a machine without a GPU

Each is a plain function with the signature of its PyTorch reference in mistral/model.py; this package
imports nothing of `mistral` (mistral/ops.py gathers these into the model's table of operations).
The kernels are imported on first use, so `import kernels` works without triton installed. On a
machine without a CUDA GPU they run on CPU tensors under Triton's interpreter: set TRITON_INTERPRET=1
before triton is first imported.
"""

import importlib

MISTRAL_FROM_SCRATCH = True  # marker: this is the project's package, not PyPI's `kernels`

_HOMES = {"rms_norm": "rmsnorm", "add_rms_norm": "rmsnorm", "apply_rotary_emb": "rope", "silu_mul": "swiglu"}


def attention(xq, keys, values, input_pos, sliding_window):
    """[B, T, H, D] queries over the [B, Hkv, L, D] cache: the decode kernel for T = 1, prefill otherwise."""
    from .decode_attention import decode_attention
    from .prefill_attention import prefill_attention

    kernel = decode_attention if xq.dim() == 4 and xq.shape[1] == 1 else prefill_attention  # both check shapes
    return kernel(xq, keys, values, input_pos, sliding_window)


def __getattr__(name):  # PEP 562: a kernel (and with it triton) is imported on first use
    if name in _HOMES:
        function = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = function
        return function
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
