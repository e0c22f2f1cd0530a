"""Triton fused kernels for the Mistral model (see each module; `TRITON_OPS` gathers them)."""

MISTRAL_FROM_SCRATCH = True  # marker: this is the project's package, not PyPI's `kernels`
