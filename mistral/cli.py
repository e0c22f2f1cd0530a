"""The `mistral` command: one subcommand per job, each a thin wrapper over the library.

    mistral make-random OUT_DIR --preset small|7b-v0.3 [--format consolidated|hf]
    mistral logits WEIGHTS --tokens 1,3,1000,4 --out logits.safetensors
    mistral tokenize WEIGHTS_OR_TOKENIZER --request request.json | --text "..."
    mistral describe WEIGHTS_OR_PRESET
    mistral inspect WEIGHTS --prompt "..." --out DIR
    mistral demo                                   (a small random checkpoint, made if absent, end to end)
    mistral generate WEIGHTS --prompt "..."        mistral chat WEIGHTS
    mistral download REPO_ID [--format consolidated|hf] [--dir DIR]
    mistral serve WEIGHTS [--port 8000] [--api-key KEY] [--served-model-name NAME] [--max-batch N]
    mistral bench [--preset small] [--device cpu] [--quick] [--json bench.json]
    mistral quantize WEIGHTS --to int8|int4 [--group-size 32|128] --out DIR

Every command that loads weights takes the same model flags (add_model_flags): WEIGHTS (a folder or
a Hub repo id), --format, --device, --dtype, --kernels. Errors from bad input end the command with
one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__, formats
from .errors import MistralError

DTYPES, FORMATS = list(formats.DTYPES), list(formats.FORMATS)  # the choices of --dtype and --format


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def parse_int_list(text: str, flag: str) -> list[int]:
    """`1,3,1000,4` (spaces around the commas allowed) as a list; anything else is refused, so
    that `1 3 4` does not quietly become 134."""
    parts = [part.strip() for part in text.split(",")]
    if parts == [""]:
        raise MistralError(f"{flag} is empty")
    if not all(part.lstrip("+-").isdigit() for part in parts):
        raise MistralError(f"{flag} must be comma-separated integers (e.g. 1,3,4), got {text!r}")
    return [int(part) for part in parts]


# --- the model flags: one definition for every command that loads weights -------------------------


def add_model_flags(p, *, device: str | None = None, dtype: str | None = None, kernels: str = "auto") -> None:
    """WEIGHTS and how to load them. The keyword arguments are the command's defaults (logits keeps
    float32 on the CPU: its output is a comparison contract)."""
    from .ops import KERNELS

    p.add_argument("weights", metavar="WEIGHTS", help="a weights folder, or a Hub repo id (owner/name) to download")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="which format to read when the folder holds both, or to download (default: consolidated)")
    p.add_argument("--device", default=device,
                   help="cpu, cuda or cuda:N" + ("" if device else " (default: cuda if available, else cpu)"))
    p.add_argument("--dtype", default=dtype, choices=DTYPES,
                   help="the weights' dtype in memory"
                        + ("" if dtype else " (default: bfloat16 on CUDA, the checkpoint's own on the CPU)"))
    p.add_argument("--kernels", default=kernels, choices=KERNELS,
                   help="which code computes the model's operations: torch = PyTorch's own operators (no custom "
                        "kernels); cpu = torch with this project's C++ mat-vec kernels for decode (CPU; built on "
                        "first use); triton = this project's fused Triton kernels (CUDA); auto = triton on CUDA, "
                        "else cpu (torch where no C++ compiler builds the kernels)")
    add_quantize_flag(p)


def add_engine_flags(p) -> None:
    """The flags of the commands that generate: the KV cache and the CPU fast path."""
    p.add_argument("--max-seq-len", type=int, default=8192, help="context length: KV-cache positions per sequence")
    p.add_argument("--compile", action="store_true",
                   help="run decode steps through torch.compile: 2-3.5x faster on the CPU, after a warm-up that "
                        "compiles (~10 s to a minute; needs a C++ compiler)")


def find_weights(a):
    """The checkpoint WEIGHTS names, in a local folder (a repo id is downloaded first)."""
    from .hub import resolve_weights
    from .loader import find_checkpoint

    return find_checkpoint(resolve_weights(a.weights, a.format), a.format)


# --- make-random ----------------------------------------------------------------------------------


def add_make_random(sub) -> None:
    p = sub.add_parser("make-random", help="write a random-weight checkpoint of the real shapes")
    p.add_argument("out_dir", type=Path, help="the folder to write (created if absent)")
    p.add_argument("--preset", default="small", help="small, 0.5b or 7b-v0.3")
    p.add_argument("--format", default="consolidated", choices=FORMATS,
                   help="consolidated: Mistral's params.json + consolidated.safetensors; hf: config.json + shards")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="the tensors' dtype on disk")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same model in both formats")
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


# --- logits ---------------------------------------------------------------------------------------


def add_logits(sub) -> None:
    p = sub.add_parser("logits", help="write the logits at every position of a token sequence")
    add_model_flags(p, device="cpu", dtype="float32", kernels="torch")
    p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,3,1000,4")
    p.add_argument("--out", required=True, type=Path, help="a .safetensors file: one float32 tensor 'logits' [T, vocab]")
    p.add_argument("--incremental", action="store_true", help="feed the tokens one by one through the KV cache")
    p.set_defaults(run=cmd_logits)


def cmd_logits(a) -> None:
    import torch
    from safetensors.torch import save_file

    from .devices import resolve_device
    from .loader import load_model

    ids = parse_int_list(a.tokens, "--tokens")
    device = resolve_device(a.device)
    checkpoint = find_weights(a)
    vocab = checkpoint.args().vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise MistralError(f"--tokens: ids {bad} are outside the vocabulary [0, {vocab})")
    started = time.perf_counter()
    model = load_model(checkpoint.folder, device=device, dtype=a.dtype, kernels=a.kernels, prefer=a.format,
                       max_seq_len=max(len(ids), 16), quantize=a.quantize)
    logging.getLogger("mistral").info("load time: %.2f s", time.perf_counter() - started)
    tokens = torch.tensor([ids], device=device)
    with torch.inference_mode():
        if a.incremental:
            cache = model.new_cache(1, len(ids))
            logits = torch.cat([
                model(tokens[:, t : t + 1], torch.tensor([t], device=device), cache) for t in range(len(ids))
            ], dim=1)
        else:
            logits = model(tokens)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"logits": logits[0].float().cpu().contiguous()}, str(a.out))
    print(f"wrote logits [{len(ids)}, {vocab}] to {a.out}")


# --- tokenize -------------------------------------------------------------------------------------


def add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="print the prompt ids of a chat request (or of plain text) as a JSON list")
    p.add_argument("tokenizer", type=Path, help="a weights folder (tokenizer.model.v3) or a tokenizer file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--request", type=Path, help="an OpenAI chat-completions request body (JSON file, - for stdin)")
    what.add_argument("--text", help="plain text to encode, without chat formatting")
    p.add_argument("--bos", action="store_true", help="with --text: put <s> first")
    p.set_defaults(run=cmd_tokenize)


def cmd_tokenize(a) -> None:
    from .errors import RequestError
    from .prompt import encode_request
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(a.tokenizer)
    if a.text is not None:
        ids = tokenizer.encode(a.text, bos=a.bos)
    else:
        source = "stdin" if str(a.request) == "-" else str(a.request)
        try:
            raw = sys.stdin.read() if source == "stdin" else a.request.read_text(encoding="utf-8")
            body = json.loads(raw)
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(f"--request {source}: cannot read it ({e})") from None
        except json.JSONDecodeError as e:
            raise RequestError(f"--request {source}: not JSON ({e})") from None
        ids = encode_request(tokenizer, body)
    print(json.dumps(ids))


# --- describe / inspect ---------------------------------------------------------------------------


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
    p.add_argument("--kv-dtype", default=None, choices=DTYPES,
                   help="KV cache dtype (default: the weights', bfloat16 for int8/int4)")
    p.add_argument("--batch", type=int, default=1, help="rows decoded together (default 1)")
    p.add_argument("--seq-lens", default="512,4096,32768", help="comma-separated sequence lengths of the roofline table")
    p.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT, help="context for the full KV-cache size")
    p.add_argument("--format", default=None, choices=FORMATS, help="which format to read if both are present")
    p.set_defaults(run=cmd_describe)


def cmd_describe(a) -> None:
    from .describe import describe, gpu, resolve

    seq_lens = tuple(parse_int_list(a.seq_lens, "--seq-lens"))
    args, source, checkpoint = resolve(a.source, a.format)
    d = describe(args, source, a.dtype, a.kv_dtype, gpu(a.gpu, a.bandwidth, a.tflops), a.batch, seq_lens,
                 a.max_context, checkpoint)
    print(json.dumps(d.to_dict(), indent=2) if a.json else d.format())


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="one forward pass, drawn: attention maps, logit lens, residual norms")
    add_model_flags(p, device="cpu", kernels="torch")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text, encoded with BOS")
    what.add_argument("--tokens", help="comma-separated token ids instead of a prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn: <s>[INST] ... [/INST]")
    p.add_argument("--layers", default="all", help="layers to draw: all, or e.g. 0,15,31 or 0-3 (default all)")
    p.add_argument("--heads", default="all", help="heads to draw in each layer: all, or e.g. 0-3 (default all)")
    p.add_argument("--top-k", type=int, default=5, help="tokens kept per position by the logit lens (default 5)")
    p.add_argument("--out", required=True, type=Path, help="folder for inspect.json and the PNGs")
    p.set_defaults(run=cmd_inspect)


def cmd_inspect(a) -> None:
    from .devices import resolve_device
    from .inspection import parse_indices, require_matplotlib, token_labels, trace, write_report
    from .loader import load_model
    from .tokenizer import Tokenizer

    require_matplotlib()  # before anything is loaded or written
    device = resolve_device(a.device)
    checkpoint = find_weights(a)
    folder, args = checkpoint.folder, checkpoint.args()
    layers = parse_indices(a.layers, args.n_layers, "layers")
    heads = parse_indices(a.heads, args.n_heads, "heads")
    tokenizer = None
    try:
        tokenizer = Tokenizer.from_path(folder)
    except MistralError:
        if a.tokens is None:
            raise
        # token ids alone can be inspected; they are labelled by number
    if a.tokens is not None:
        if a.chat:
            raise MistralError("--chat wraps a --prompt; it cannot be combined with --tokens")
        ids = parse_int_list(a.tokens, "--tokens")
    elif a.chat:
        from .prompt import encode_chat

        ids = encode_chat(tokenizer, [{"role": "user", "content": a.prompt}])
    else:
        ids = tokenizer.encode(a.prompt, bos=True)
    bad = [i for i in ids if not 0 <= i < args.vocab_size]
    if bad:
        raise MistralError(f"--tokens: ids {bad[:5]} are outside the vocabulary [0, {args.vocab_size})")
    model = load_model(folder, device=device, dtype=a.dtype, kernels=a.kernels, prefer=a.format,
                       max_seq_len=max(len(ids), 16), quantize=a.quantize)
    labels = token_labels(tokenizer, ids) if tokenizer else None
    t = trace(model, ids, labels, a.top_k)
    pieces = tokenizer.id_to_piece if tokenizer else str
    files = write_report(t, a.out, layers, heads, a.prompt, pieces)
    top = t.lens_ids[-1, -1, 0].item()
    print(f"{len(ids)} tokens; next token {pieces(top)!r} (p={t.lens_probs[-1, -1, 0].item():.3f})")
    print(f"wrote {len(files)} files to {a.out}: " + ", ".join(f.name for f in files))


# --- generate / chat / demo / download ------------------------------------------------------------


DEFAULT_MAX_TOKENS = 512


# The sampling flags are these fields of the request protocol, with its defaults and docs; the
# API checks their values (protocol.py), so the CLI's ranges are the server's.
SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "seed")


def _add_sampling_flags(p) -> None:
    import dataclasses

    from .protocol import GenerationRequest

    # The CLI caps an answer (as llama-cli's -n does); the Python API and the server keep OpenAI's
    # meaning of no max_tokens: up to the end of the context.
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="the most tokens an answer may have; 0: up to the end of the context")
    fields = {f.name: f for f in dataclasses.fields(GenerationRequest)}
    for name in SAMPLING_FLAGS:
        f = fields[name]
        kind = int if f.type in (int, int | None) else float
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=f.default, help=f.metadata["doc"])
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable, at most 4)")


def sampling_settings(a, llm=None, prompt_len: int = 0) -> dict:
    """The sampling flags as API arguments. --max-tokens caps the answer at what the context leaves
    after the prompt (given `llm` and the prompt's length): the API refuses a max_tokens beyond the
    context, as OpenAI does, but a CLI cap is an upper bound, not a request for that many."""
    cap = a.max_tokens or None
    if cap is not None and llm is not None:
        cap = max(1, min(cap, llm.max_seq_len - prompt_len))  # a prompt that fills the context is refused as such
    return dict(max_tokens=cap, stop=a.stop, **{name: getattr(a, name) for name in SAMPLING_FLAGS})


def _load(a, max_batch: int = 1):
    from .generate import Mistral

    llm = Mistral.from_pretrained(a.weights, device=a.device, dtype=a.dtype, kernels=a.kernels, format=a.format,
                                  quantize=a.quantize, max_batch=max_batch, max_seq_len=a.max_seq_len, compile=a.compile)
    if a.compile:
        print("compiling the decode step (~10 s to a minute) ...", file=sys.stderr, flush=True)
        llm.warm_up(sampling_settings(a))
    freeze_what_loading_left()
    return llm


def freeze_what_loading_left() -> None:
    """What loading and compiling left (dynamo's and inductor's graphs, guards and generated code:
    ~500,000 objects for the small preset) stays for the process's life. Frozen, the collector no
    longer walks it in each full collection, which took 250-420 ms every few seconds of serving the
    small preset with --compile, every stream frozen meanwhile (BENCHMARKS.md, #17)."""
    gc.collect()
    gc.freeze()


def _print_stream(chunks) -> dict | None:
    """Print streamed content as it comes; return the usage chunk, if any."""
    usage = None
    for chunk in chunks:
        if not chunk["choices"]:
            usage = chunk
            continue
        choice = chunk["choices"][0]
        delta = choice.get("delta", {})
        print(delta.get("content") or "", end="", flush=True)
        for call in delta.get("tool_calls") or ():
            print(f"[tool call] {call['function']['name']}({call['function']['arguments']})", end="", flush=True)
    print()
    return usage


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="answer one prompt (as a user chat turn) on stdout")
    add_model_flags(p)
    add_engine_flags(p)
    p.add_argument("--prompt", required=True, help="the user's message (with --raw: the text to continue)")
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--raw", action="store_true", help="plain text completion, no chat format")
    _add_sampling_flags(p)
    p.set_defaults(run=cmd_generate)


def cmd_generate(a) -> None:
    from .prompt import encode_chat

    llm = _load(a)
    if a.raw:
        prompt_len = len(llm.tokenizer.encode(a.prompt, bos=True))
        for chunk in llm.create_completion(a.prompt, stream=True, **sampling_settings(a, llm, prompt_len)):
            print(chunk["choices"][0]["text"] if chunk["choices"] else "", end="", flush=True)
        print()
        return
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    prompt_len = len(encode_chat(llm.tokenizer, messages))
    _print_stream(llm.create_chat_completion(messages, stream=True, **sampling_settings(a, llm, prompt_len)))


def add_chat(sub) -> None:
    p = sub.add_parser("chat", help="interactive chat with streamed answers (/reset, /exit)")
    add_model_flags(p)
    add_engine_flags(p)
    p.add_argument("--system", default=None, help="a system prompt")
    _add_sampling_flags(p)
    p.set_defaults(run=cmd_chat)


def cmd_chat(a) -> None:
    from .prompt import encode_chat

    llm = _load(a)
    history: list[dict] = []
    print(f"chatting with {llm.model_name} ({llm.system_fingerprint}); /reset clears the history, /exit or Ctrl-D quits")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history.clear()
            print("(history cleared)")
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + history
        answer = []
        try:
            sampling = sampling_settings(a, llm, len(encode_chat(llm.tokenizer, messages)))
            for chunk in llm.create_chat_completion(messages, stream=True, **sampling):
                for choice in chunk["choices"]:
                    text = choice["delta"].get("content") or ""
                    answer.append(text)
                    print(text, end="", flush=True)
        except KeyboardInterrupt:  # stop this answer, keep the session
            print(" [interrupted]", end="")
        except MistralError as e:
            history.pop()
            print(f"error: {e}")
            continue
        print()
        history.append({"role": "assistant", "content": "".join(answer)})


def demo_folder() -> Path:
    """weights/demo-small when run at the root of this project's checkout (beside the other
    checkpoints); anywhere else a user cache folder, so that no `weights/` appears in the current one."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and Path.cwd().resolve() == checkout:
        return Path("weights/demo-small")
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mistral-from-scratch" / "demo-small"


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a small random checkpoint (made if absent)")
    p.add_argument("--weights", type=Path, default=None,
                   help="where the demo checkpoint is, or is made (default: weights/demo-small at the root of "
                        "this project's checkout, else ~/.cache/mistral-from-scratch/demo-small)")
    p.add_argument("--prompt", default="Hi there! What is Mistral-7B?", help="the user's message")
    p.add_argument("--max-tokens", type=int, default=48, help="the answer's length")
    p.set_defaults(run=cmd_demo)


def cmd_demo(a) -> None:
    from .args import preset
    from .generate import Mistral
    from .responses import dumps
    from .loader import find_checkpoint
    from .make_random import make_random, v3_tokenizer_file

    folder = a.weights or demo_folder()
    if not (folder / "params.json").exists():
        if v3_tokenizer_file() is None:
            raise MistralError("the demo needs the real v3 tokenizer file that ships with mistral-common: "
                               "pip install mistral-common (or: pip install -e '.[demo]')")
        print(f"making a small random checkpoint in {folder} ...")
        make_random(folder, preset("small"), "consolidated", "float32", seed=0)
    else:
        print(f"using the small random checkpoint in {folder}")
    find_checkpoint(folder)
    print("NOTE: these weights are random, so the answer below is nonsense; the pipeline around it is real:\n"
          "  v3 prompt format -> prefill + KV-cache decode -> sampling -> streaming detokenizer -> OpenAI chunks.\n"
          "For the real model: mistral download mistralai/Mistral-7B-Instruct-v0.3 --dir weights/Mistral-7B-Instruct-v0.3\n"
          "  then: mistral chat weights/Mistral-7B-Instruct-v0.3   (needs a Hub token with access; a GPU is advised)\n")
    llm = Mistral.from_pretrained(folder, device="cpu", kernels="torch", max_batch=1, max_seq_len=1024, quiet=True)
    messages = [{"role": "system", "content": "Act like you are a helpful assistant."}, {"role": "user", "content": a.prompt}]
    print(f"user: {a.prompt}\nassistant: ", end="", flush=True)
    chunks: list[dict] = []
    for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=a.max_tokens, temperature=0.7, seed=0,
                                            stream_options={"include_usage": True}):
        chunks.append(chunk)
        if chunk["choices"]:
            print(chunk["choices"][0]["delta"].get("content") or "", end="", flush=True)
    print("\n\nthe stream was", len(chunks), "chat.completion.chunk objects; the first and the last two:")
    for chunk in (chunks[0], *chunks[-2:]):
        print("  data:", dumps(chunk))


def add_download(sub) -> None:
    p = sub.add_parser("download", help="download one format of a Hub checkpoint")
    p.add_argument("repo_id", help="e.g. mistralai/Mistral-7B-Instruct-v0.3")
    p.add_argument("--format", default="consolidated", choices=FORMATS,
                   help="consolidated: Mistral's own files; hf: the Hugging Face shards (the same weights again)")
    p.add_argument("--dir", type=Path, default=None, help="the folder to download into (default: weights/<repo name>)")
    p.add_argument("--revision", default=None, help="a branch, tag or commit (default: main)")
    p.set_defaults(run=cmd_download)


def cmd_download(a) -> None:
    from .hub import download

    folder = download(a.repo_id, a.format, local_dir=a.dir or Path("weights") / a.repo_id.split("/")[-1], revision=a.revision)
    print(f"downloaded {a.repo_id} ({a.format}) to {folder}")


# --- serve ----------------------------------------------------------------------------------------


def add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models")
    add_model_flags(p)
    add_engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on; 0.0.0.0 listens on every interface "
                                                       "(default: 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $MISTRAL_API_KEY; no key if that is unset)")
    p.add_argument("--served-model-name", default=None, help="the model name clients ask for (default: the folder's name)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together: KV-cache rows")
    p.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a row; more get 429")
    p.add_argument("--kv-cache-gb", type=float, default=None,
                   help="GiB of KV-cache blocks shared by all sequences (default: max-batch x max-seq-len positions)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="don't reuse the cached keys and values of a prompt's prefix (a system prompt, earlier turns)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="read long prompts this many tokens per step, so running streams go on meanwhile (default 512)")
    p.add_argument("--prefill-chunk-decay", type=int, default=None, metavar="POSITION",
                   help="past this position, prompt chunks shrink as POSITION / position (at least 2 tokens), so "
                        "that a late chunk's attention over the whole prefix costs about what an early one does")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: torch's, one per core)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running answers may take to finish before they are cut (default 30)")
    p.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="browser origins allowed by CORS, e.g. https://app.example.com, or '*' for any "
                        "(default: none, no CORS headers)")
    p.add_argument("--no-access-log", action="store_true", help="no log line per request (uvicorn's access log, on stdout; on by default)")
    p.set_defaults(run=cmd_serve)


def cmd_serve(a) -> None:
    import signal

    import uvicorn

    from .devices import resolve_device
    from .generate import Mistral
    from .server import create_app, uvicorn_config

    for flag in ("port", "max_batch", "max_seq_len", "max_queue", "threads", "prefill_chunk", "prefill_chunk_decay",
                 "kv_cache_gb"):
        value = getattr(a, flag)
        if value is not None and value < (0 if flag == "port" else 1):
            raise MistralError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    if a.threads is not None:
        import torch

        torch.set_num_threads(a.threads)
    if a.api_key is not None and not a.api_key.strip():
        raise MistralError("--api-key is empty: give a key, or leave the flag out for a server without one")
    if a.shutdown_timeout < 0:
        raise MistralError(f"--shutdown-timeout must be >= 0, got {a.shutdown_timeout:g}")
    api_key = a.api_key if a.api_key is not None else os.environ.get("MISTRAL_API_KEY") or None
    # What would fail once the server is up is checked before it says it listens.
    resolve_device(a.device)
    find_weights(a)
    from . import tp

    # Under torchrun only rank 0 serves HTTP; the other ranks must not take the port too (two
    # sockets bound to it make rank 0's listen fail, depending on which binds first).
    follower = tp.follower()
    sock = None if follower else bind(a.host, a.port)
    url = f"http://{a.host}:{sock.getsockname()[1]}/v1" if sock is not None else None

    def load() -> Mistral:
        # A fixed decode shape (all rows; see engine.py) makes each request's greedy output
        # independent of the others in the batch.
        llm = Mistral.from_pretrained(a.weights, a.device, a.dtype, kernels=a.kernels, format=a.format, quantize=a.quantize,
                                      max_batch=a.max_batch, max_seq_len=a.max_seq_len, model_name=a.served_model_name,
                                      fixed_batch_shape=True, max_waiting=a.max_queue, compile=a.compile,
                                      kv_cache_gb=a.kv_cache_gb, prefix_caching=not a.no_prefix_caching,
                                      prefill_chunk=a.prefill_chunk, prefill_chunk_decay=a.prefill_chunk_decay)
        if a.compile:
            print("mistral serve: compiling the decode step (~10 s to a minute) ...", file=sys.stderr, flush=True)
            llm.warm_up()
        freeze_what_loading_left()
        print(f"mistral serve: {llm.model_name} is ready at {url}", file=sys.stderr, flush=True)
        return llm

    if follower:  # they load their shard, then follow rank 0's model calls until it exits
        load()
        return
    failed: list[BaseException] = []

    def stop_on_load_error(e: BaseException) -> None:
        failed.append(e)
        server.should_exit = True

    app = create_app(load, api_key=api_key, served_model_name=a.served_model_name, on_load_error=stop_on_load_error,
                     allowed_origins=a.allowed_origins)
    config = uvicorn_config(app, host=a.host, port=a.port, shutdown_timeout=a.shutdown_timeout,
                            log_level="info" if a.verbose else "warning", access_log=not a.no_access_log)
    if not a.no_access_log:  # uvicorn's own lines stay at `warning` unless -v; the access log is on anyway
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = uvicorn.Server(config)
    print(f"mistral serve: loading {a.weights}; listening on {url} (GET /health is 503 until the model is ready)",
          file=sys.stderr, flush=True)
    # uvicorn raises the signal it stopped on again once it has shut down; SIGTERM is how
    # supervisors ask for a stop, and a stop that finished its work exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    server.run(sockets=[sock])
    if failed:
        raise MistralError(f"loading {a.weights} failed: {failed[0]}")


def bind(host: str, port: int):
    """A socket bound to host:port for the server to listen on, or one line saying why not."""
    import errno
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        raise MistralError(f"--host {host}: cannot listen there ({e.strerror or e})") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind does
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise MistralError(f"--port {port}: {host}:{port} is already in use (another server?); choose another "
                               "--port") from None
        raise MistralError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


# --- bench ----------------------------------------------------------------------------------------


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="generation speed on random full-size weights: bandwidth floor, ours, transformers "
                                     "(under torchrun: the model split over the processes)")
    p.add_argument("--preset", default=None, help="7b-v0.3 (the default on CUDA), small (the default on CPU) or 0.5b")
    p.add_argument("--device", default=None, help="default cuda when available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="16 decode steps per figure instead of 128, fewer repeats and smaller machine probes "
                        "(on the CPU: the small preset in about a minute; the CI's smoke run)")
    p.add_argument("--steps", type=int, default=None, help="decode steps per figure (default: 128, 16 with --quick)")
    p.add_argument("--no-compile", action="store_true", help="skip transformers + torch.compile")
    p.add_argument("--compile-budget", type=int, default=240, help="seconds allowed for transformers' compile (default 240)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    p.set_defaults(run=cmd_bench)


def cmd_bench(a) -> None:
    from .bench.command import main as bench_main

    bench_main(a)  # under torchrun: rank 0 measures, the other ranks follow (bench/command.py)


# --- quantize -------------------------------------------------------------------------------------


def add_quantize_flag(p) -> None:
    p.add_argument("--quantize", default=None, choices=formats.QUANTIZE_ON_LOAD,
                   help="quantize the linear layers while loading: int8 per output channel, int4 in groups of 32 "
                        "(int4-128: of 128) along the input; a `mistral quantize` checkpoint needs no flag")


def add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-only quantized checkpoint (int8 or int4) that every command loads")
    p.add_argument("weights", type=Path, help="a full-precision checkpoint folder (either format)")
    p.add_argument("--to", required=True, choices=list(formats.QUANTIZATIONS),
                   help="int8: one scale per output channel; int4: one scale per --group-size inputs")
    p.add_argument("--group-size", type=int, default=32, choices=formats.INT4_GROUP_SIZES, help="int4: weights per scale")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="dtype of the scales and of the unquantized tensors (default: the checkpoint's own)")
    p.add_argument("--format", default=None, choices=FORMATS, help="which format to read when the folder holds both")
    p.add_argument("--out", required=True, type=Path, help="the folder to write")
    p.set_defaults(run=cmd_quantize)


def cmd_quantize(a) -> None:
    from .quantize import Quantization, write_quantized

    if a.to == "int8" and a.group_size != 32:
        raise MistralError("--group-size is for int4; int8 has one scale per output channel")
    q = Quantization("int4", a.group_size) if a.to == "int4" else Quantization("int8")
    out = write_quantized(a.weights, a.out, q, dtype=a.dtype, prefer=a.format)
    size = (out / "consolidated.safetensors").stat().st_size
    print(f"wrote an {a.to} checkpoint ({size / 2**30:.2f} GiB) to {out}")


# --- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mistral", description="Mistral-7B-Instruct-v0.3 from scratch",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"mistral-from-scratch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (add_make_random, add_logits, add_tokenize, add_describe, add_inspect,
                add_generate, add_chat, add_demo, add_download, add_serve, add_bench, add_quantize):
        add(sub)
    for p in sub.choices.values():
        p.formatter_class = HelpFormatter
        # -v after the subcommand too; SUPPRESS keeps a -v given before it
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log what each step does to stderr")
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
