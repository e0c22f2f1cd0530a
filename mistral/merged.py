"""Merged projections: each layer's wq|wk|wv, and w1|w3, computed as one matmul.

At batch 1 a matmul is a read of its weights; one read of a [6144, 4096] matrix keeps a GPU busier
than three reads of [4096 | 1024 | 1024, 4096] (the small ones are too short to reach full
bandwidth), and is one launch instead of three. Applied from outside the model: `merge_projections`
gives each layer's attention and feed-forward a `MergedProjection` that stands in for its
`project_qkv` / `project_gate_up` method. The parameters keep their names and shapes: each becomes a view of its rows
of the merged matrix, so `state_dict()` and the checkpoint names are unchanged and no memory is added.
Call it once the model is on its device and in its dtype: `.to()` would copy the views apart from the
merged matrix. `unmerged(model)` runs the separate matmuls again, over the same storage.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .model import TORCH_OPS, Linear, Transformer


def stack_rows(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The tensors stacked along dim 0, and a view of each one's rows in the stack."""
    merged = torch.cat(tensors)
    return merged, list(merged.split([t.shape[0] for t in tensors]))


class MergedProjection(nn.Module):
    """x @ [w_a | w_b | ...]ᵀ as one matmul, split back into each projection's output."""

    def __init__(self, *linears: Linear):
        super().__init__()
        for linear in linears:
            if type(linear) is not Linear:
                raise TypeError(f"only plain Linear layers merge, got {type(linear).__name__} (a quantized or sharded model?)")
        merged, views = stack_rows([linear.weight.detach() for linear in linears])  # [sum of out_features, in_features]
        self.sizes = [linear.weight.shape[0] for linear in linears]
        for linear, view in zip(linears, views):
            linear.weight = nn.Parameter(view, requires_grad=False)  # the old copy is freed
        self.register_buffer("weight", merged, persistent=False)  # not a checkpoint tensor
        self.ops = linears[0].ops if hasattr(linears[0], "ops") else TORCH_OPS

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [..., in] -> one [..., out_i] per projection
        return self.ops.linear(x, self.weight).split(self.sizes, dim=-1)


class MergedQuantizedProjection(nn.Module):
    """The same for Int8Linear / Int4Linear layers (quantize.py): one layer of their class whose
    weight and scales are theirs stacked by rows; each keeps views of its rows. A CPU kernel computes
    every output row by the same instructions whatever the matrix's height, so the merged call gives
    each projection the bits of its own call, with one activation quantization and one call instead
    of three (or two)."""

    def __init__(self, *linears: nn.Module):
        super().__init__()
        from .quantize import Int4Linear, Int8Linear

        first = linears[0]
        kind = type(first)
        if kind not in (Int8Linear, Int4Linear) or any(type(linear) is not kind for linear in linears):
            raise TypeError("quantized projections merge with their own kind: got "
                            + ", ".join(type(linear).__name__ for linear in linears))
        shape = (first.in_features, getattr(first, "group_size", None))
        if any((linear.in_features, getattr(linear, "group_size", None)) != shape for linear in linears):
            raise ValueError("quantized projections merge only with the same input size and group size")
        self.sizes = [linear.out_features for linear in linears]
        with torch.device("meta"):  # its own buffers are replaced at once: allocate none
            merged = kind(first.in_features, sum(self.sizes), *([first.group_size] if kind is Int4Linear else []))
        for name in ("weight", "scales"):  # not checkpoint tensors: the projections' views are
            stacked, views = stack_rows([getattr(linear, name) for linear in linears])
            merged.register_buffer(name, stacked, persistent=False)
            for linear, view in zip(linears, views):
                setattr(linear, name, view)  # the old copy is freed
        merged.cpu_matvec = first.cpu_matvec
        if getattr(first, "cpu_packed", None) is not None:
            merged.pack_for_cpu()
            for linear in linears:  # their own packed copies would double the memory
                linear.cpu_packed = linear.cpu_scales_and_zeros = None
        self.linear = merged

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # [..., in] -> one [..., out_i] per projection
        return self.linear(x).split(self.sizes, dim=-1)


def merge_projections(model: Transformer) -> Transformer:
    """Merge every layer's wq|wk|wv and w1|w3, in place (see the module's docstring); plain Linear
    layers, or quantized ones of one kind (MergedQuantizedProjection)."""
    for layer in model.layers:
        for module, method, linears in ((layer.attention, "project_qkv", ("wq", "wk", "wv")),
                                        (layer.feed_forward, "project_gate_up", ("w1", "w3"))):
            if method not in module.__dict__:
                parts = [getattr(module, name) for name in linears]
                kind = MergedProjection if all(type(p) is Linear for p in parts) else MergedQuantizedProjection
                merged = kind(*parts)
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
