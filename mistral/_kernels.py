"""Import this project's top-level `kernels` package, and refuse a different one of that name.

`kernels` is also the name of an unrelated PyPI distribution (Hugging Face's kernel hub). If that one
shadows ours on sys.path we would silently run someone else's code, so we check a marker.
"""

from __future__ import annotations


def triton_ops():
    import kernels

    if not getattr(kernels, "MISTRAL_FROM_SCRATCH", False):
        raise ImportError(
            f"the 'kernels' package imported from {getattr(kernels, '__file__', '?')} is not this project's "
            "(the PyPI distribution 'kernels' may be shadowing it); uninstall it or fix sys.path"
        )
    return kernels.TRITON_OPS
