"""Merged projections: each layer's wq|wk|wv, and w1|w3, computed as one matmul.

At batch 1 a matmul is a read of its weights; one read of a [6144, 4096] matrix keeps a GPU busier
than three reads of [4096 | 1024 | 1024, 4096] (the small ones are too short to reach full
bandwidth), and is one launch instead of three. Applied from outside the model: `merge_projections`
gives each layer's attention and feed-forward a `MergedProjection` that stands in for its
`project_qkv` / `project_gate_up` method. The parameters keep their names and shapes: each becomes a view of its rows
of the merged matrix, so `state_dict()` and the checkpoint names are unchanged and no memory is added.
Call it once the model is on its device and in its dtype: `.to()` would copy the views apart from the
merged matrix. `unmerged(model)` runs the separate matmuls again, over the same storage.

On the CPU a quantized model's layers (mistral/quantize.py) merge too when their decode rows run in
the mat-vec kernels of kernels/cpu (the loader merges them there): one call quantizes x once for all
the projections and streams one longer matrix. In the 0.5B model wk and wv alone read ~20 GB/s
(int8), against ~27 for the larger matrices.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .model import TORCH_OPS, Linear, Transformer
from .quantize import Int4Linear, Int8Linear, cpu_kernel_rows


class MergedProjection(nn.Module):
    """x @ [w_a | w_b | ...]ᵀ as one matmul, split back into each projection's output."""

    def __init__(self, *linears: Linear):
        super().__init__()
        for linear in linears:
            if type(linear) is not Linear:
                raise TypeError(f"only plain Linear layers merge, got {type(linear).__name__} (a quantized or sharded model?)")
        merged = torch.cat([linear.weight.detach() for linear in linears])  # [sum of out_features, in_features]
        self.sizes = [linear.weight.shape[0] for linear in linears]
        start = 0
        for linear, rows in zip(linears, self.sizes):
            linear.weight = nn.Parameter(merged[start : start + rows], requires_grad=False)  # the old copy is freed
            start += rows
        self.register_buffer("weight", merged, persistent=False)  # not a checkpoint tensor
        self.ops = linears[0].ops if hasattr(linears[0], "ops") else TORCH_OPS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [..., in] -> one [..., out_i] per projection
        return self.ops.linear(x, self.weight).split(self.sizes, dim=-1)


class MergedQuantizedProjection(nn.Module):
    """x @ [w_a | w_b | ...]ᵀ for Int8Linear or Int4Linear layers of one input whose decode rows run
    in kernels/cpu: those rows in one kernel call over the merged weights and scales; more rows (a
    prefill) each projection on its own, exactly as unmerged. The kernel computes each output from
    its own weight row, so a merged decode row has the bits of the separate calls'."""

    def __init__(self, *linears: Int8Linear | Int4Linear):
        super().__init__()
        if not self.mergeable(linears):
            raise TypeError("only quantized layers of one kind, on the CPU kernels, merge: "
                            + ", ".join(type(m).__name__ for m in linears))
        first = linears[0]
        self.sizes = [m.out_features for m in linears]
        self.in_features, self.group_size = first.in_features, getattr(first, "group_size", None)
        for name in ("weight", "scales"):
            merged = torch.cat([getattr(m, name) for m in linears])  # along the output rows
            start = 0
            for m, rows in zip(linears, self.sizes):
                setattr(m, name, merged[start : start + rows])  # the old copy is freed
                start += rows
            self.register_buffer(name, merged, persistent=False)  # not checkpoint tensors
        self.linears = tuple(linears)  # not submodules: they stay their layer's

    @staticmethod
    def mergeable(linears) -> bool:
        def kind(m):
            return type(m), m.in_features, getattr(m, "group_size", None), m.scales.dtype, m.weight.device

        return (type(linears[0]) in (Int8Linear, Int4Linear) and all(m.cpu_matvec for m in linears)
                and all(kind(m) == kind(linears[0]) for m in linears))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [..., in] -> one [..., out_i] per projection
        if not cpu_kernel_rows(x, self.in_features):
            return tuple(m(x) for m in self.linears)
        from kernels.cpu import int4_matvec, int8_matvec

        x = x.contiguous()
        out = int8_matvec(x, self.weight, self.scales) if self.group_size is None else \
            int4_matvec(x, self.weight, self.scales, self.group_size)
        return out.split(self.sizes, dim=-1)


def merge_projections(model: Transformer) -> Transformer:
    """Merge every layer's wq|wk|wv and w1|w3, in place (see the module's docstring)."""
    for layer in model.layers:
        for module, method, linears in ((layer.attention, "project_qkv", ("wq", "wk", "wv")),
                                        (layer.feed_forward, "project_gate_up", ("w1", "w3"))):
            if method not in module.__dict__:
                parts = [getattr(module, name) for name in linears]
                if type(parts[0]) not in (Int8Linear, Int4Linear):
                    merged = MergedProjection(*parts)
                elif MergedQuantizedProjection.mergeable(parts):
                    merged = MergedQuantizedProjection(*parts)
                else:
                    continue  # quantized, off the CPU kernels: the separate layers
                module.add_module(f"merged_{method}", merged)  # a submodule: `use_ops` reaches it
                module.__dict__[method] = merged  # an instance attribute comes before the class's method
    return model


@contextlib.contextmanager
def unmerged(model: Transformer):
    """Inside the block, a merged model runs its three (and two) separate matmuls, over the same storage."""
    saved = []
    for layer in model.layers:
        for module, method in ((layer.attention, "project_qkv"), (layer.feed_forward, "project_gate_up")):
            saved.append((module, method, module.__dict__.pop(method, None)))  # back to the class's method
    try:
        yield model
    finally:
        for module, method, merged in saved:
            if merged is not None:
                module.__dict__[method] = merged
