"""A "scripted" checkpoint: real shapes, weights set by hand so that greedy decoding follows a chain.

With every attention output (wo) and feed-forward output (w2) zero, the residual stream is the
current token's embedding, so the logits depend on the current token alone: a bigram model. Token
t_i's embedding is the unit vector e_i, and the output row of t_{i+1} is e_i, so greedy decoding
walks t_0 -> t_1 -> ... -> t_n. Each token of the chain must be distinct (a bigram model has one
successor per token), so the text is spelled with distinct pieces (`spell`).

This lets tests drive the real engine, sampler, detokenizer and tool-call parser into paths a
random model never takes (a well-formed tool call, EOS at a chosen step).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mistral.args import ModelArgs
from mistral.loader import tensor_shapes
from mistral.make_random import v3_tokenizer_file, write_safetensors
from mistral.tokenizer import Tokenizer

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=32,
                 norm_eps=1e-5, vocab_size=32768, rope_theta=1e6)


def spell(tokenizer: Tokenizer, text: str, avoid: set[int] = frozenset()) -> list[int]:
    """Ids, all distinct and not in `avoid`, whose decode (after a control token) is `text`."""
    pieces: dict[str, list[int]] = {}
    for i in range(tokenizer.vocab_size):
        if tokenizer.is_control(i):
            continue
        if tokenizer.is_byte(i):
            b = tokenizer.byte_value[i]
            if b < 0x80:
                pieces.setdefault(chr(b), []).append(i)
            continue
        pieces.setdefault(tokenizer.id_to_piece(i).replace("\u2581", " "), []).append(i)
    # every piece that matches at each position, longest first
    matches = [
        sorted((p for p in pieces if p and text.startswith(p, at) and not (at == 0 and p.startswith(" "))), key=len, reverse=True)
        for at in range(len(text))
    ]
    # ids that can still be used from each position on: whether the rest of the text can be spelled
    # depends only on which of those are taken, so a failure is remembered under that key (without
    # it, a text that cannot be spelled takes exponential time to say so)
    later: list[set[int]] = [set() for _ in range(len(text) + 1)]
    for at in reversed(range(len(text))):
        later[at] = later[at + 1] | {i for p in matches[at] for i in pieces[p]}
    failed: set[tuple[int, frozenset[int]]] = set()

    def search(at: int, used: set[int]) -> list[int] | None:
        if at == len(text):
            return []
        key = (at, frozenset(used & later[at]))
        if key in failed:
            return None
        for piece in matches[at]:
            for i in pieces[piece]:
                if i not in used and i not in avoid:
                    rest = search(at + len(piece), used | {i})
                    if rest is not None:
                        return [i, *rest]
        failed.add(key)
        return None

    ids = search(0, set())
    if ids is None:
        raise ValueError(f"cannot spell {text!r} with distinct pieces")
    return ids


def write_scripted(folder: Path, chain: list[int]) -> Path:
    """A consolidated checkpoint whose greedy successor of chain[i] is chain[i + 1]."""
    if len(set(chain)) != len(chain) or len(chain) > ARGS.dim:
        raise ValueError("the chain needs distinct tokens, at most dim of them")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(__import__("json").dumps(ARGS.to_params()))
    shapes = tensor_shapes(ARGS)
    gen = torch.Generator().manual_seed(0)
    emb = 0.01 * torch.randn(shapes["tok_embeddings.weight"], generator=gen)
    out = torch.zeros(shapes["output.weight"])
    for i, token in enumerate(chain):
        emb[token] = 0
        emb[token, i] = 1.0
        if i + 1 < len(chain):
            out[chain[i + 1], i] = 1.0

    def make(name: str) -> torch.Tensor:
        if name == "tok_embeddings.weight":
            return emb
        if name == "output.weight":
            return out
        if name.endswith("norm.weight"):
            return torch.ones(shapes[name])
        if name.endswith(("wo.weight", "w2.weight")):
            return torch.zeros(shapes[name])  # the blocks add nothing to the residual stream
        return 0.02 * torch.randn(shapes[name], generator=gen)

    write_safetensors(folder / "consolidated.safetensors", shapes, torch.float32, make)
    (folder / "tokenizer.model.v3").write_bytes(v3_tokenizer_file().read_bytes())
    return folder
