"""Look inside one forward pass: attention maps, the logit lens, and the residual stream's norms.

Three views of what the model does with a prompt:

    attention       softmax(q·kᵀ / √head_dim) of every head: which earlier tokens each token reads
    logit lens      the residual stream after each layer, decoded as if it were the last one
                    (final RMSNorm, then the output head): how the prediction forms layer by layer
                    (nostalgebraist, "interpreting GPT: the logit lens", 2020)
    residual norms  ‖h‖ at each layer and position: the stream grows as layers add to it

Nothing here touches the model's normal path. For the one pass it watches, `trace` swaps each
layer's `Attention.ops` for a copy whose `attention` writes the softmax out explicitly and keeps
the probabilities, and adds forward hooks that keep each layer's output; both are undone before
`trace` returns, so a model that is never traced runs exactly the code it always runs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import MistralError
from .model import Transformer
from .progress import progress

MAX_TOKENS = 512  # attention maps are T × T per head: beyond this neither the PNGs nor the JSON are readable


def explicit_attention(
    xq: torch.Tensor,  # [B, T, H, D]
    keys: torch.Tensor,  # [B, Hkv, L, D]
    values: torch.Tensor,  # [B, Hkv, L, D]
    input_pos: torch.Tensor,  # [B]
    sliding_window: int | None,
    *,
    record: Callable[[torch.Tensor], None],
) -> torch.Tensor:  # [B, T, H, D]
    """`model.attention` with the softmax written out, in fp32, handing its probabilities to `record`.

    Same signature and result as the fused scaled_dot_product_attention it stands in for.
    """
    B, T, H, D = xq.shape
    n_rep = H // keys.shape[1]
    q = xq.transpose(1, 2).float()  # [B, H, T, D]
    # Query head h reads KV head h // n_rep: the grouping SDPA's enable_gqa (and HF's repeat_kv) use.
    k = keys.float().repeat_interleave(n_rep, dim=1)  # [B, H, L, D]
    v = values.float().repeat_interleave(n_rep, dim=1)  # [B, H, L, D]
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, T, L]
    q_pos = input_pos[:, None] + torch.arange(T, device=xq.device)  # [B, T]
    k_pos = torch.arange(keys.shape[2], device=xq.device)  # [L]
    visible = k_pos <= q_pos[..., None]  # [B, T, L]: causal, and hides cache slots not yet written
    if sliding_window is not None:
        visible &= k_pos > q_pos[..., None] - sliding_window
    probs = scores.masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)  # [B, H, T, L]
    record(probs)
    return (probs @ v).transpose(1, 2).to(xq.dtype)  # [B, T, H, D]


@dataclass
class Trace:
    """What one forward pass over one sequence of T tokens did; depth 0 is the embedding output,
    depth i + 1 the output of layer i."""

    tokens: list[int]
    labels: list[str]  # one printable label per token (its SentencePiece piece, or its id)
    attention: list[torch.Tensor]  # per layer: [H, T, T] fp32 probabilities, row = query, column = key
    residual: torch.Tensor  # [n_layers + 1, T, dim], in the model's dtype
    logits: torch.Tensor  # [T, vocab] fp32: the pass's own output
    lens_ids: torch.Tensor  # [n_layers + 1, T, k]: top tokens of each depth's residual, decoded
    lens_probs: torch.Tensor  # [n_layers + 1, T, k]
    n_kv_heads: int  # query head h reads KV head h // (H // n_kv_heads)

    def kv_head(self, head: int) -> int:
        return head // (self.attention[0].shape[0] // self.n_kv_heads)

    @property
    def residual_norms(self) -> torch.Tensor:  # [n_layers + 1, T] fp32
        return self.residual.float().norm(dim=-1)

    @property
    def depth_names(self) -> list[str]:
        return ["embeddings"] + [f"layer {i}" for i in range(len(self.attention))]


def trace(model: Transformer, tokens: list[int], labels: list[str] | None = None, top_k: int = 5) -> Trace:
    """Run `tokens` (one sequence, starting at position 0) through `model` once and record it."""
    if not tokens:
        raise MistralError("nothing to inspect: the prompt encodes to no tokens")
    if len(tokens) > MAX_TOKENS:
        raise MistralError(f"the prompt is {len(tokens)} tokens; inspect draws T×T maps, keep it to {MAX_TOKENS}")
    vocab = model.args.vocab_size
    bad = [t for t in tokens if not 0 <= t < vocab]
    if bad:
        raise MistralError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    if len(tokens) > model.max_seq_len:
        raise MistralError(f"the prompt is {len(tokens)} tokens, longer than the model's max_seq_len {model.max_seq_len}")
    if not 1 <= top_k <= vocab:
        raise MistralError(f"top_k must be in [1, {vocab}], got {top_k}")

    n = model.args.n_layers
    attention: list[torch.Tensor | None] = [None] * n
    residual: list[torch.Tensor | None] = [None] * (n + 1)

    def keep_attention(layer: int, probs: torch.Tensor) -> None:
        attention[layer] = probs[0].detach().cpu()  # [H, T, T]

    def keep_residual(depth: int):
        def hook(module, inputs, output):
            residual[depth] = output[0].detach()  # [T, dim]
        return hook

    blocks = list(model.layers)
    saved_ops = [block.attention.ops for block in blocks]
    handles = [model.tok_embeddings.register_forward_hook(keep_residual(0))]
    handles += [block.register_forward_hook(keep_residual(i + 1)) for i, block in enumerate(blocks)]
    try:
        for i, block in enumerate(blocks):
            record = functools.partial(keep_attention, i)
            block.attention.ops = dataclasses.replace(
                block.attention.ops, name=f"{block.attention.ops.name}+record",
                attention=functools.partial(explicit_attention, record=record),
            )
        device = model.output.weight.device
        with torch.inference_mode():
            logits = model(torch.tensor([tokens], device=device))[0].float()  # [T, vocab]
            h = torch.stack(residual)  # [n + 1, T, dim]
            # The logit lens: every depth decoded as if it were the last. The last depth's lens is
            # the model's own output, which the tests use to check the recording.
            tops = [model.output(model.norm(h[d])).float().softmax(-1).topk(top_k, dim=-1) for d in range(n + 1)]
            lens_probs = torch.stack([top.values for top in tops])  # [n + 1, T, k]
            lens_ids = torch.stack([top.indices for top in tops])
    finally:
        for handle in handles:
            handle.remove()
        for block, ops in zip(blocks, saved_ops):
            block.attention.ops = ops
    if labels is None:
        labels = [str(t) for t in tokens]
    return Trace(list(tokens), list(labels), attention, h.cpu(), logits.cpu(), lens_ids.cpu(), lens_probs.cpu(),
                 model.args.n_kv_heads)


# ---------------------------------------------------------------------------------------------
# Token labels
# ---------------------------------------------------------------------------------------------


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token as its SentencePiece piece (`▁Paris`, `<0x0A>`, `[INST]`): spaces, bytes and
    control tokens stay visible, which decoded text would hide."""
    return [tokenizer.id_to_piece(i) for i in ids]


# ---------------------------------------------------------------------------------------------
# Output: JSON and PNGs
# ---------------------------------------------------------------------------------------------


def to_json(t: Trace, layers: list[int], heads: list[int], prompt: str | None = None, pieces=None) -> dict:
    """The numbers behind the pictures. `pieces(id)` names the lens's tokens (default: their ids)."""
    name = pieces or str
    return {
        "prompt": prompt,
        "tokens": t.tokens,
        "labels": t.labels,
        "attention": {
            "layout": "probs[query][key]: row i is token i's attention over tokens 0..i (zero above the diagonal)",
            "maps": [
                {"layer": l, "head": h, "kv_head": t.kv_head(h), "probs": t.attention[l][h].tolist()}
                for l in layers for h in heads
            ],
        },
        "logit_lens": [
            {
                "depth": depth,
                "after": t.depth_names[depth],
                "top": [
                    [{"id": int(i), "piece": name(int(i)), "prob": float(p)}
                     for i, p in zip(t.lens_ids[depth, pos], t.lens_probs[depth, pos])]
                    for pos in range(len(t.tokens))
                ],
            }
            for depth in range(len(t.depth_names))
        ],
        "residual_norms": {"depths": t.depth_names, "norms": t.residual_norms.tolist()},
    }


def require_matplotlib():
    """matplotlib's Figure, or one line saying how to install it (called before anything is written)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch
    except ImportError:
        raise MistralError("inspect draws with matplotlib, which is not installed: "
                           "pip install matplotlib (or: pip install -e '.[demo]')") from None
    return Figure


@functools.cache
def _drawable() -> frozenset[int]:
    """The code points matplotlib's default font has glyphs for."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def _label(piece: str, width: int = 10) -> str:
    """A piece as it can be drawn: characters the font lacks as U+XXXX (not empty boxes), cut to width."""
    drawable = _drawable()
    text = "".join(c if ord(c) in drawable else f"U+{ord(c):04X}" for c in piece)
    return text if len(text) <= width else text[: width - 1] + "…"


def _ticks(ax, labels: list[str], axis: str, max_labels: int = 40) -> None:
    # Beyond max_labels a label on every token is too small to read: every step-th, with its index.
    n = len(labels)
    step = max(1, math.ceil(n / max_labels))
    idx = list(range(0, n, step))
    size = 8 if n <= 24 else 7
    text = [_label(labels[i], 12) if step == 1 else f"{i}:{_label(labels[i], 12)}" for i in idx]
    if axis == "x":
        ax.set_xticks(idx, text, rotation=90, fontsize=size)
    else:
        ax.set_yticks(idx, text, fontsize=size)


def plot_attention(t: Trace, layer: int, heads: list[int], path: Path) -> None:
    """One PNG per layer: a panel per head, queries down the side, keys along the bottom."""
    Figure = require_matplotlib()
    T = len(t.tokens)
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    panel = min(max(3.0, 0.12 * min(T, 40) + 1.5), 6.5)
    fig = Figure(figsize=(cols * panel + 1.0, rows * panel + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    grouped = t.n_kv_heads < t.attention[layer].shape[0]
    image = None
    for ax, h in zip(axes.flat, heads):
        probs = t.attention[layer][h].clone()
        probs[torch.ones(T, T, dtype=torch.bool).triu(1)] = float("nan")  # the future: not drawn
        image = ax.imshow(probs.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {h}" + (f" (KV head {t.kv_head(h)})" if grouped else ""), fontsize=9)
        _ticks(ax, t.labels, "x")
        _ticks(ax, t.labels, "y")
    for ax in list(axes.flat)[len(heads):]:
        ax.set_visible(False)
    fig.suptitle(f"Attention, layer {layer}: row = query token, column = key token it reads")
    fig.colorbar(image, ax=axes, shrink=0.6, label="probability")
    _save(fig, path)


def plot_logit_lens(t: Trace, path: Path, pieces: Callable[[int], str]) -> None:
    """Top-1 token of each depth (rows) at each position (columns), shaded by its probability."""
    Figure = require_matplotlib()
    depths, T = t.lens_ids.shape[:2]
    # about 0.4 inch a column: a 5-character piece at 6 points; past 64 columns the cells only shade
    fig = Figure(figsize=(2.5 + 0.4 * min(T, 64), 2.5 + 0.32 * depths), layout="constrained")
    ax = fig.subplots()
    top = t.lens_probs[:, :, 0].numpy()
    image = ax.imshow(top, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    for d in range(depths) if T <= 64 else ():
        for pos in range(T):
            ax.text(pos, d, _label(pieces(int(t.lens_ids[d, pos, 0])), 10 if T <= 24 else 5), ha="center",
                    va="center", fontsize=7 if T <= 24 else 6, color="white" if top[d, pos] > 0.6 else "black")
    _ticks(ax, t.labels, "x")
    ax.set_yticks(range(depths), t.depth_names, fontsize=7)
    ax.invert_yaxis()  # embeddings at the bottom, the last layer (the model's prediction) on top
    ax.set_xlabel("input token (each column predicts the token after it)")
    fig.suptitle("Logit lens: the most likely next token if the residual stream were decoded at each depth")
    fig.colorbar(image, ax=ax, label="p(top token)")
    _save(fig, path)


def plot_residual_norms(t: Trace, path: Path) -> None:
    """‖h‖ by depth and position (heatmap, log scale), and by depth for each position (lines)."""
    Figure = require_matplotlib()
    from matplotlib.colors import LogNorm

    norms = t.residual_norms.numpy()  # [depths, T]
    depths, T = norms.shape
    fig = Figure(figsize=(min(max(10.0, 9 + 0.25 * T), 24.0), 1.5 + max(4.0, 0.25 * depths)), layout="constrained")
    heat, lines = fig.subplots(1, 2, width_ratios=[min(max(1.0, T / 12), 3.0), 1.0])
    image = heat.imshow(norms, cmap="magma", aspect="auto", interpolation="nearest",
                        norm=LogNorm(vmin=max(norms.min(), 1e-6), vmax=max(norms.max(), 1e-6)))
    _ticks(heat, t.labels, "x")
    heat.set_yticks(range(depths), t.depth_names, fontsize=7)
    heat.invert_yaxis()
    heat.set_title("‖residual‖ by depth and token")
    fig.colorbar(image, ax=heat, label="L2 norm")
    for pos in range(T):
        lines.plot(range(depths), norms[:, pos], color="0.7", linewidth=0.6)
    lines.plot(range(depths), norms.mean(axis=1), color="C0", linewidth=2, label="mean over tokens")
    if T > 1:
        lines.plot(range(depths), norms[:, 0], color="C3", linewidth=1.2, label=f"token 0 ({_label(t.labels[0])})")
    lines.set_yscale("log")
    step = max(1, math.ceil(depths / 34))
    lines.set_xticks(range(0, depths, step), t.depth_names[::step], rotation=90, fontsize=7)
    lines.legend(fontsize=7)
    lines.set_title("by depth, one line per token")
    fig.suptitle("Residual-stream norms")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with warnings.catch_warnings():  # pieces from scripts the default font lacks are drawn as boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=100)



def write_report(
    t: Trace,
    out_dir: str | Path,
    layers: list[int],
    heads: list[int],
    prompt: str | None = None,
    pieces: Callable[[int], str] | None = None,
) -> list[Path]:
    """Write inspect.json and the PNGs into out_dir; returns the files written."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MistralError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    pieces = pieces or str
    path = out / "inspect.json"
    path.write_text(json.dumps(to_json(t, layers, heads, prompt, pieces), ensure_ascii=False) + "\n")
    written = [path]
    pictures = [(out / f"attention_layer{layer:02d}.png", functools.partial(plot_attention, t, layer, heads))
                for layer in layers]
    pictures += [(out / "logit_lens.png", functools.partial(plot_logit_lens, t, pieces=pieces)),
                 (out / "residual_norms.png", functools.partial(plot_residual_norms, t))]
    for path, draw in progress(pictures, desc="drawing", unit="picture"):  # one picture per layer: seconds each
        draw(path=path)
        written.append(path)
    return written


def parse_indices(text: str | None, n: int, what: str) -> list[int]:
    """`all` (or None), or a comma-separated list of indices and ranges: `0,3,5-7`."""
    if text is None or text.strip().lower() == "all":
        return list(range(n))
    chosen: list[int] = []
    for part in (part.strip() for part in text.split(",")):  # `0 15` is refused, not read as 015
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                values = list(range(int(lo), int(hi) + 1))
                if not values:
                    raise ValueError
            else:
                values = [int(part)]
        except ValueError:
            raise MistralError(f"--{what}: {part!r} is not an index or a range like 2-5") from None
        for v in values:
            if not 0 <= v < n:
                raise MistralError(f"--{what}: {v} is out of range; the model has {n} {what} (0..{n - 1})")
            if v not in chosen:
                chosen.append(v)
    if not chosen:
        raise MistralError(f"--{what} is empty")
    return chosen
