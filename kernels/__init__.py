"""Triton fused kernels for the Mistral model, one module per operation:

    rmsnorm.py            rms_norm, add_rms_norm (residual add + RMSNorm in one pass)
    rope.py               apply_rotary_emb (queries and keys in one launch),
                          apply_rotary_emb_to_cache (the same, writing keys and values into the cache)
    swiglu.py             silu_mul (SwiGLU's elementwise gate)
    decode_attention.py   one new token per row: GQA-packed, split-KV, per-row lengths
    prefill_attention.py  many new tokens per row: causal, GQA, flash-style, optional sliding window
    quant_matmul.py       int8 / int4 weight-only matmul for a few rows (mistral/quantize.py uses it on CUDA)

    compile_check.py      compiles all of them for a GPU architecture on a machine without a GPU

`TRITON_OPS` puts them in the model's `Ops` table (mistral/model.py, whose `TORCH_OPS` is the plain
PyTorch reference every kernel matches). It is built on first use, so `import kernels` works without
triton installed. On a machine without a CUDA GPU the kernels run on CPU tensors under Triton's
interpreter: set TRITON_INTERPRET=1 before triton is first imported.
"""

MISTRAL_FROM_SCRATCH = True  # marker: this is the project's package, not PyPI's `kernels`


def _triton_ops():
    from mistral.model import Ops

    from .decode_attention import decode_attention
    from .prefill_attention import prefill_attention
    from .rmsnorm import add_rms_norm, rms_norm
    from .rope import apply_rotary_emb, apply_rotary_emb_to_cache
    from .swiglu import silu_mul

    def attention(xq, keys, values, input_pos, sliding_window):
        """[B, T, H, D] queries over the [B, Hkv, L, D] cache: decode kernel for T = 1, prefill otherwise."""
        kernel = decode_attention if xq.dim() == 4 and xq.shape[1] == 1 else prefill_attention  # both check shapes
        return kernel(xq, keys, values, input_pos, sliding_window)

    return Ops("triton", rms_norm, add_rms_norm, apply_rotary_emb, attention, silu_mul,
               rotary_emb_to_cache=apply_rotary_emb_to_cache)


def __getattr__(name):  # PEP 562: TRITON_OPS (and with it triton) is imported on first use
    if name == "TRITON_OPS":
        globals()["TRITON_OPS"] = ops = _triton_ops()
        return ops
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
