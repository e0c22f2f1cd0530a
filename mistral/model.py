"""Mistral-7B-v0.3: a decoder-only transformer, written out in plain PyTorch.

One token's path, top to bottom:

    tokens ──tok_embeddings──▶ h                                      [B, T, dim]
    for each of n_layers TransformerBlocks:
        h = h + Attention(attention_norm(h))     grouped-query attention with rotary positions
        h = h + FeedForward(ffn_norm(h))         SwiGLU: w2(silu(w1 x) * w3 x)
    logits = output(norm(h))                                          [B, T, vocab_size]

Papers: "Mistral 7B" (Jiang et al., 2023, arXiv:2310.06825); RMSNorm (Zhang & Sennrich, 2019);
RoFormer / rotary embeddings (Su et al., 2021); GQA (Ainslie et al., 2023); GLU variants /
SwiGLU (Shazeer, 2020). Parameter names are the keys of the official `consolidated.safetensors`
(`layers.0.attention.wq.weight`, `layers.0.feed_forward.w1.weight`, ...), so every tensor in the
checkpoint maps to one line here.

Every forward has one path. The primitive operations (the matmul of a linear layer, the norms,
rotary embedding, attention, the SwiGLU gate) go through `self.ops`, an `Ops` table: `TORCH_OPS`
below is their plain-PyTorch definition, the one to study. Speed is applied from outside this file
and never changes the arithmetic: `mistral/ops.py` swaps in other tables (CPU-tuned PyTorch, fused
Triton kernels), `mistral/merged.py` merges projections, `mistral/quantize.py` and `mistral/tp.py`
swap linear layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .kv_cache import BLOCK_SIZE, PagedKVCache

# ---------------------------------------------------------------------------------------------
# The primitive operations, in plain PyTorch. Shapes: B batch rows, T new tokens per row,
# H query heads, Hkv key/value heads, D head_dim, L cached positions visible to attention.
# ---------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight, computed in fp32 and returned in x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return normed.type_as(x) * weight


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add followed by the next norm: returns (rms_norm(x + residual), x + residual)."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def precompute_freqs(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each [max_seq_len, head_dim // 2], in fp32.

    Pair i of a head (dimensions 2i and 2i+1) turns by angle pos * theta^(-2i / head_dim).
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary_emb(
    xq: torch.Tensor,  # [B, T, H, D]
    xk: torch.Tensor,  # [B, T, Hkv, D]
    cos: torch.Tensor,  # [B, T, D/2] fp32, the angles of each token's position
    sin: torch.Tensor,  # [B, T, D/2]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head as the complex number x[2i] + i·x[2i+1].

    This is Mistral's (and Meta's Llama's) interleaved layout. Hugging Face checkpoints store wq/wk
    with their rows permuted for a "rotate-half" layout instead; the loader undoes that.
    """
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, D/2]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # each [B, T, heads, D/2]
        return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).type_as(x)

    return rotate(xq), rotate(xk)


def attention(
    xq: torch.Tensor,  # [B, T, H, D] queries of the new tokens; row b's token t sits at input_pos[b] + t
    keys: torch.Tensor,  # [B, Hkv, L, D] cached keys; key j sits at position j
    values: torch.Tensor,  # [B, Hkv, L, D]
    input_pos: torch.Tensor,  # [B] int64
    sliding_window: int | None,
) -> torch.Tensor:  # [B, T, H, D]
    """Causal grouped-query attention of new tokens over the KV cache.

    Each of the Hkv key/value heads serves H // Hkv query heads; `enable_gqa` broadcasts them instead
    of copying K/V. Cache slots beyond a row's position (not yet written, or stale) are masked out.
    """
    T, L = xq.shape[1], keys.shape[2]
    q_pos = input_pos[:, None] + torch.arange(T, device=xq.device)  # [B, T]
    k_pos = torch.arange(L, device=xq.device)  # [L]
    mask = k_pos <= q_pos[..., None]  # [B, T, L]
    if sliding_window is not None:
        mask &= k_pos > q_pos[..., None] - sliding_window
    out = F.scaled_dot_product_attention(
        xq.transpose(1, 2), keys, values, attn_mask=mask[:, None], enable_gqa=True
    )  # [B, H, T, D]
    return out.transpose(1, 2)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(gate) * up, elementwise (gate = x @ w1ᵀ, up = x @ w3ᵀ)."""
    return F.silu(gate) * up


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ: [..., in_features] -> [..., out_features] (Mistral's linear layers have no bias)."""
    return F.linear(x, weight)


@dataclass(frozen=True)
class Ops:
    """The model's primitive operations: what a backend (mistral/ops.py) supplies, with these signatures."""

    name: str
    linear: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    apply_rotary_emb: Callable
    attention: Callable
    silu_mul: Callable


TORCH_OPS = Ops("torch", linear, rms_norm, add_rms_norm, apply_rotary_emb, attention, silu_mul)


# ---------------------------------------------------------------------------------------------
# The KV cache
# ---------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of every layer, allocated once up front, one row per sequence. (The engine's
    cache is the paged `kv_cache.PagedKVCache`, with the same `view` / `update` / `read`.)

    k[layer] and v[layer] are [max_batch, n_kv_heads, max_seq_len, head_dim]. A forward pass writes
    the new tokens' keys and values at explicit per-row positions (a tensor, so no host sync), which
    lets rows of one batch sit at different positions and lets the decode step be graph-captured.
    """

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], length: int | None = None):
        self.k, self.v = k, v
        self.length = length if length is not None else k[0].shape[2]  # positions attention reads

    @classmethod
    def allocate(cls, args: ModelArgs, max_batch: int, max_seq_len: int, device=None, dtype=None) -> "KVCache":
        shape = (max_batch, args.n_kv_heads, max_seq_len, args.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        return cls(k, v)

    @property
    def max_batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k[0].shape[2]

    def view(self, start: int = 0, stop: int | None = None, length: int | None = None) -> "KVCache":
        """Rows start..stop (no copy), with attention reading only the first `length` positions."""
        stop = self.max_batch if stop is None else stop
        length = self.max_seq_len if length is None else min(length, self.max_seq_len)
        return KVCache([k[start:stop] for k in self.k], [v[start:stop] for v in self.v], length)

    def update(
        self, layer: int, input_pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write xk, xv ([B, T, Hkv, D]) at positions input_pos[b] + t; return this layer's
        keys and values as [B, Hkv, length, D] views."""
        B, T = xk.shape[:2]
        rows = torch.arange(B, device=xk.device)[:, None]  # [B, 1]
        pos = input_pos[:, None] + torch.arange(T, device=xk.device)  # [B, T]
        k, v = self.k[layer], self.v[layer]
        k[rows, :, pos] = xk  # advanced indices on dims 0 and 2: the indexed view is [B, T, Hkv, D]
        v[rows, :, pos] = xv
        return self.read(layer)

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values as [B, Hkv, length, D] views."""
        return self.k[layer][:, :, : self.length], self.v[layer][:, :, : self.length]


# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear without bias (Mistral has none); its matmul is `ops.linear`."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in_features] -> [..., out_features]
        return self.ops.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(x + residual), x + residual), in one pass (one fused kernel on the Triton backend)."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.sliding_window = args.sliding_window
        self.wq = Linear(args.dim, args.n_heads * args.head_dim)
        self.wk = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wv = Linear(args.dim, args.n_kv_heads * args.head_dim)
        self.wo = Linear(args.n_heads * args.head_dim, args.dim)
        self.ops = TORCH_OPS

    def forward(
        self,
        x: torch.Tensor,  # [B, T, dim], already normed
        input_pos: torch.Tensor,  # [B]
        cos: torch.Tensor,  # [B, T, D/2]
        sin: torch.Tensor,  # [B, T, D/2]
        cache: KVCache | PagedKVCache,
    ) -> torch.Tensor:  # [B, T, dim]
        B, T, _ = x.shape
        xq, xk, xv = self.project_qkv(x)
        xq = xq.view(B, T, self.n_heads, self.head_dim)  # [B, T, H, D]
        xk = xk.view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        xv = xv.view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        xq, xk = self.ops.apply_rotary_emb(xq, xk, cos, sin)
        keys, values = cache.update(self.layer_id, input_pos, xk, xv)  # each [B, Hkv, L, D]
        out = self.ops.attention(xq, keys, values, input_pos, self.sliding_window)  # [B, T, H, D]
        return self.wo(out.reshape(B, T, self.n_heads * self.head_dim))

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, dim] -> xq [B, T, H·D], xk and xv [B, T, Hkv·D]. (mistral/merged.py can make the
        three one matmul.)"""
        return self.wq(x), self.wk(x), self.wv(x)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = Linear(args.dim, args.hidden_dim)  # gate
        self.w2 = Linear(args.hidden_dim, args.dim)  # down
        self.w3 = Linear(args.dim, args.hidden_dim)  # up
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, dim] -> [B, T, dim]
        gate, up = self.project_gate_up(x)  # each [B, T, hidden_dim]
        return self.w2(self.ops.silu_mul(gate, up))

    def project_gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, dim] -> gate (w1) and up (w3), each [B, T, hidden_dim]. (mistral/merged.py can make
        the two one matmul.)"""
        return self.w1(x), self.w3(x)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(args, layer_id)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, input_pos, cos, sin, cache):  # x: [B, T, dim]
        r = self.attention(self.attention_norm(x), input_pos, cos, sin, cache)
        normed, h = self.ffn_norm.add_and_norm(r, x)  # h = x + r, normed = ffn_norm(h)
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, max_seq_len: int = 32768, ops: Ops = TORCH_OPS):
        super().__init__()
        self.args = args
        self.max_seq_len = max_seq_len
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        cos, sin = precompute_freqs(args.head_dim, max_seq_len, args.rope_theta, device=self.output.weight.device)
        self.register_buffer("freqs_cos", cos, persistent=False)  # [max_seq_len, D/2] fp32
        self.register_buffer("freqs_sin", sin, persistent=False)
        self.use_ops(ops)

    def use_ops(self, ops: Ops) -> "Transformer":
        """Compute every module's primitive operations with `ops` (mistral/ops.py: `get_ops`)."""
        self.ops = ops
        for module in self.modules():
            if hasattr(module, "ops"):
                module.ops = ops
        return self

    def init_freqs(self, device=None) -> None:
        """(Re)compute the rotary tables, e.g. after building the model on the meta device."""
        self.freqs_cos, self.freqs_sin = precompute_freqs(
            self.args.head_dim, self.max_seq_len, self.args.rope_theta, device=device
        )

    def new_cache(self, max_batch: int, max_seq_len: int | None = None) -> KVCache:
        weight = self.tok_embeddings.weight  # in the activations' dtype, even with quantized linear layers
        return KVCache.allocate(self.args, max_batch, max_seq_len or self.max_seq_len, weight.device, weight.dtype)

    def new_paged_cache(self, num_blocks: int, max_batch: int, max_seq_len: int | None = None,
                        block_size: int = BLOCK_SIZE) -> PagedKVCache:
        """The engine's cache: a pool of `num_blocks` blocks and a block table of `max_batch` rows
        (kv_cache.py), read in place by an attention that can (`reads_pages`), else gathered."""
        weight = self.tok_embeddings.weight
        return PagedKVCache.allocate(self.args, num_blocks, max_batch, max_seq_len or self.max_seq_len, block_size,
                                     weight.device, weight.dtype,
                                     in_place=getattr(self.ops.attention, "reads_pages", False))

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] int64
        input_pos: torch.Tensor | None = None,  # [B] int64: position of tokens[:, 0] in each row
        cache: KVCache | PagedKVCache | None = None,  # rows 0..B-1 of the cache are the batch rows
        last_only: bool = False,  # return only the logits of the last position ([B, 1, V])
        rows: torch.Tensor | None = None,  # [K] int64: return only the logits of these batch rows ([K, T, V])
    ) -> torch.Tensor:  # [B, T, vocab_size], in the weights' dtype
        B, T = tokens.shape
        if cache is None:  # a plain forward over the whole sequence: a throwaway cache of length T
            if input_pos is not None:
                raise ValueError("input_pos needs a cache: without one the tokens start at position 0")
            cache = self.new_cache(B, T)
        if input_pos is None:
            input_pos = torch.zeros(B, dtype=torch.long, device=tokens.device)
        pos = input_pos[:, None] + torch.arange(T, device=tokens.device)  # [B, T]
        cos, sin = self.freqs_cos[pos], self.freqs_sin[pos]  # [B, T, D/2] each

        h = self.tok_embeddings(tokens)  # [B, T, dim]
        for layer in self.layers:
            h = layer(h, input_pos, cos, sin, cache)
        if last_only:
            h = h[:, -1:]
        if rows is not None:
            h = h[rows]
        return self.output(self.norm(h))  # [B, T, vocab_size]
