"""The `mistral` command: one subcommand per job, each a thin wrapper over the library.

    mistral make-random OUT_DIR --preset small|7b-v0.3 [--format consolidated|hf]
    mistral logits WEIGHTS --tokens 1,3,1000,4 --out logits.safetensors
    mistral tokenize WEIGHTS_OR_TOKENIZER --request request.json | --text "..."
    mistral describe WEIGHTS_OR_PRESET
    mistral inspect WEIGHTS --prompt "..." --out DIR

Errors from bad input end the command with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import MistralError


# --- make-random -------------------------------------------------------------------------------


def add_make_random(sub) -> None:
    p = sub.add_parser("make-random", help="write a random-weight checkpoint of the real shapes")
    p.add_argument("out_dir", type=Path)
    p.add_argument("--preset", default="small", help="small, 0.5b or 7b-v0.3 (default: small)")
    p.add_argument("--format", default="consolidated", choices=["consolidated", "hf"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", action="store_true", help="don't copy mistral-common's v3 tokenizer in")
    p.set_defaults(run=cmd_make_random)


def cmd_make_random(a) -> None:
    from .args import preset
    from .make_random import make_random, v3_tokenizer_file

    out = make_random(a.out_dir, preset(a.preset), a.format, a.dtype, a.seed, tokenizer=not a.no_tokenizer)
    size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
    print(f"wrote a random {a.preset} checkpoint ({a.format}, {a.dtype}, {size / 2**30:.2f} GiB) to {out}")
    if not a.no_tokenizer and v3_tokenizer_file() is None:
        print("note: no tokenizer copied in (install mistral-common to get the real v3 tokenizer file)", file=sys.stderr)


# --- logits --------------------------------------------------------------------------------------


def add_logits(sub) -> None:
    p = sub.add_parser("logits", help="write the logits at every position of a token sequence")
    p.add_argument("weights", type=Path)
    p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,3,1000,4")
    p.add_argument("--out", required=True, type=Path, help="a .safetensors file: one float32 tensor 'logits' [T, vocab]")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--incremental", action="store_true", help="feed the tokens one by one through the KV cache")
    p.add_argument("--kernels", default="torch", choices=["torch", "triton", "auto"])
    p.add_argument("--format", default=None, choices=["consolidated", "hf"], help="which format to read if both are present")
    p.set_defaults(run=cmd_logits)


def parse_token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise MistralError(f"--tokens must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise MistralError("--tokens is empty")
    return ids


def cmd_logits(a) -> None:
    import torch
    from safetensors.torch import save_file

    from .loader import find_checkpoint, load_model

    ids = parse_token_ids(a.tokens)
    vocab = find_checkpoint(a.weights, a.format).args().vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise MistralError(f"--tokens: ids {bad} are outside the vocabulary [0, {vocab})")
    started = time.perf_counter()
    model = load_model(a.weights, device=a.device, dtype=a.dtype, kernels=a.kernels, prefer=a.format,
                       max_seq_len=max(len(ids), 16))
    logging.getLogger("mistral").info("load time: %.2f s", time.perf_counter() - started)
    tokens = torch.tensor([ids], device=a.device)
    with torch.inference_mode():
        if a.incremental:
            cache = model.new_cache(1, len(ids))
            logits = torch.cat([
                model(tokens[:, t : t + 1], torch.tensor([t], device=a.device), cache) for t in range(len(ids))
            ], dim=1)
        else:
            logits = model(tokens)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits[0].float().cpu().contiguous()}, str(a.out))
    print(f"wrote logits [{len(ids)}, {vocab}] to {a.out}")


# --- tokenize (issue 3) --------------------------------------------------------------------------


def add_tokenize(sub) -> None:
    pass


# --- describe / inspect (issue 8) ----------------------------------------------------------------


def add_describe(sub) -> None:
    from .describe import DEFAULT_MAX_CONTEXT, DTYPE_BYTES, GPUS

    p = sub.add_parser("describe", help="the architecture in numbers: tensors, memory, FLOPs, roofline floor")
    p.add_argument("source", metavar="WEIGHTS_OR_PRESET",
                   help="a preset (7b-v0.3, small, 0.5b), a weights folder, or a params.json / config.json")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--gpu", default=None, help=f"roofline GPU: {', '.join(GPUS)} (default h100; spec-sheet figures)")
    p.add_argument("--bandwidth", type=float, default=None, help="memory bandwidth in GB/s (replaces the preset's)")
    p.add_argument("--tflops", type=float, default=None, help="peak dense FLOP rate in TFLOP/s (replaces the preset's)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES), help="weights' dtype (default bfloat16)")
    p.add_argument("--kv-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="KV cache dtype (default: the weights', bfloat16 for int8/int4)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--seq-lens", default="512,4096,32768", help="sequence lengths of the roofline table")
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, help="context for the full KV-cache size")
    p.add_argument("--format", default=None, choices=["consolidated", "hf"], help="which format to read if both are present")
    p.set_defaults(run=cmd_describe)


def cmd_describe(a) -> None:
    from .describe import describe, gpu, resolve

    try:
        seq_lens = tuple(int(n) for n in a.seq_lens.replace(" ", "").split(",") if n)
    except ValueError:
        raise MistralError(f"--seq-lens must be comma-separated integers, got {a.seq_lens!r}") from None
    args, source, checkpoint = resolve(a.source, a.format)
    d = describe(args, source, a.dtype, a.kv_dtype, gpu(a.gpu, a.bandwidth, a.tflops), a.batch, seq_lens,
                 a.max_context, checkpoint)
    print(json.dumps(d.to_dict(), indent=2) if a.json else d.format())


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="one forward pass, drawn: attention maps, logit lens, residual norms")
    p.add_argument("weights", type=Path)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text, encoded with BOS")
    what.add_argument("--tokens", help="comma-separated token ids instead of a prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn: <s>[INST] ... [/INST]")
    p.add_argument("--layers", default="all", help="layers to draw: all, or e.g. 0,15,31 or 0-3 (default all)")
    p.add_argument("--heads", default="all", help="heads to draw in each layer: all, or e.g. 0-3 (default all)")
    p.add_argument("--top-k", type=int, default=5, help="tokens kept per position by the logit lens (default 5)")
    p.add_argument("--out", required=True, type=Path, help="folder for inspect.json and the PNGs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: the checkpoint's own")
    p.add_argument("--format", default=None, choices=["consolidated", "hf"], help="which format to read if both are present")
    p.set_defaults(run=cmd_inspect)


def cmd_inspect(a) -> None:
    from .lens import parse_indices, token_labels, trace, write_report
    from .loader import find_checkpoint, load_model
    from .tokenizer import Tokenizer

    args = find_checkpoint(a.weights, a.format).args()
    layers = parse_indices(a.layers, args.n_layers, "layers")
    heads = parse_indices(a.heads, args.n_heads, "heads")
    tokenizer = None
    if a.prompt is not None or a.chat:
        tokenizer = Tokenizer.from_path(a.weights)
    else:
        try:
            tokenizer = Tokenizer.from_path(a.weights)
        except MistralError:  # token ids alone can be inspected; they are labelled by number
            pass
    if a.tokens is not None:
        if a.chat:
            raise MistralError("--chat wraps a --prompt; it cannot be combined with --tokens")
        ids = parse_token_ids(a.tokens)
    elif a.chat:
        try:
            from .prompt import encode_chat
        except ImportError:
            raise MistralError("--chat needs mistral/prompt.py (the v3 prompt format), which this checkout lacks") from None
        ids = encode_chat(tokenizer, [{"role": "user", "content": a.prompt}])
    else:
        ids = tokenizer.encode(a.prompt, bos=True)
    bad = [i for i in ids if not 0 <= i < args.vocab_size]
    if bad:
        raise MistralError(f"--tokens: ids {bad[:5]} are outside the vocabulary [0, {args.vocab_size})")
    model = load_model(a.weights, device=a.device, dtype=a.dtype, prefer=a.format, max_seq_len=max(len(ids), 16))
    labels = token_labels(tokenizer, ids) if tokenizer else None
    t = trace(model, ids, labels, a.top_k)
    pieces = tokenizer.id_to_piece if tokenizer else str
    files = write_report(t, a.out, layers, heads, a.prompt, pieces)
    top = t.lens_ids[-1, -1, 0].item()
    print(f"{len(ids)} tokens; next token {pieces(top)!r} (p={t.lens_probs[-1, -1, 0].item():.3f})")
    print(f"wrote {len(files)} files to {a.out}: " + ", ".join(f.name for f in files))


# --- main ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral", description="Mistral-7B-Instruct-v0.3 from scratch")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_make_random, add_logits, add_tokenize, add_describe, add_inspect):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.run(args)
    except (MistralError, ValueError, FileNotFoundError) as e:
        print(f"mistral {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
