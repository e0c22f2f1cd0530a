"""Benchmark: ours against llama.cpp on this CPU, on the same random weights, per precision.

    python scripts/bench_llamacpp.py [--size 0.5b] [--rounds 3] [--threads 2] [--cache ~/.cache/mistral-llamacpp]
    python scripts/bench_llamacpp.py --quality      (only each quantization's error against fp32)

1. llama.cpp: built once into --cache from the source that the `llama-cpp-python` sdist on PyPI
   vendors (`pip download --no-deps --no-binary :all: llama-cpp-python`, then cmake: llama-bench,
   llama-quantize, llama-simple; ~10 CPU-minutes). Its own `convert_hf_to_gguf.py` (with the gguf-py
   beside it) turns the Hugging Face-format copy of our random checkpoint into GGUF f32 and bf16;
   `llama-quantize --pure` makes q8_0 and q4_0 from the f32 file (--pure: every matrix, the output
   head included, in that type, as ours quantizes every matrix and the output head).
2. Same weights, same answer: llama.cpp's f32 greedy continuation of a prompt (llama-simple, 32
   tokens) must be the text of ours (exit status 1 otherwise).
3. Timing, interleaved (ours, llama.cpp, per precision, --rounds times; the load average printed
   each round; the best of the rounds kept): decode of 128 tokens at batch 1, and prefill of 512.
   Ours (--kernels, default auto: the CPU kernels, as `mistral` and the Python API load):
   `Engine(compile=True)` decode (the compiled step; compiled in a warm-up) and the eager
   `Engine` (what a user gets without --compile), the decode span from the first token to the last; prefill is one eager forward of 512 tokens. llama.cpp:
   `llama-bench -t THREADS -n 128 -p 0` and `-p 512 -n 0`, one repetition per round.
   Precisions: fp32 vs f32, bf16 vs bf16, our int8 (per channel) vs q8_0, our int4 (groups of 32)
   vs q4_0; our int8/int4 compute in --quant-dtype (activations and scales).
4. One table: tokens/s, % of the floor (bandwidth / bytes a decode step reads, the bandwidth the
   fastest fp32/bf16 mat-vec of `mistral.bench.timing.matvec_bandwidth` reaches here), and ours / llama.cpp.

Busy neighbours slow both engines; rounds interleave so that both see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from mistral.bench.timing import cpu_name, matvec_bandwidth, stamp_tokens, weight_bytes_per_token
from mistral.engine import Engine
from mistral.loader import load_model
from mistral.make_random import random_checkpoints
from mistral.tokenizer import Tokenizer

PROMPT = "The weights of a language model are read once for every token it writes, so"
TOOLS = ("llama-bench", "llama-quantize", "llama-simple")
# (our label, our dtype or quantization, the GGUF type)
PRECISIONS = {"fp32": ("float32", None, "f32"), "bf16": ("bfloat16", None, "bf16"),
              "int8": (None, "int8", "q8_0"), "int4": (None, "int4", "q4_0")}


# --- llama.cpp -----------------------------------------------------------------------------------


def ensure_llamacpp(cache: Path) -> tuple[Path, Path]:
    """(the folder of the built tools, the llama.cpp source folder), building them if absent."""
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        print("downloading the llama-cpp-python sdist ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python", "-d", str(cache)], check=True)
        sdists = sorted(cache.glob("llama_cpp_python-*.tar.gz"))
    root = cache / sdists[-1].name.removesuffix(".tar.gz")
    if not root.exists():
        with tarfile.open(sdists[-1]) as tar:
            tar.extractall(cache, filter="data")
    src = root / "vendor" / "llama.cpp"
    bin_dir = src / "build" / "bin"
    if not all((bin_dir / tool).exists() for tool in TOOLS):
        print(f"building llama.cpp in {src / 'build'} (~10 CPU-minutes) ...", flush=True)
        subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF"], check=True)
        subprocess.run(["cmake", "--build", str(src / "build"), "-j", str(os.cpu_count() or 2),
                        "--target", *TOOLS], check=True)
    return bin_dir, src


def ensure_ggufs(cache: Path, size: str, hf: Path, bin_dir: Path, src: Path) -> dict[str, Path]:
    out = {}
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    for gtype in ("f32", "bf16"):
        path = out[gtype] = cache / "gguf" / f"{size}-{gtype}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outtype", gtype,
                            "--outfile", str(path)], check=True, env=env, capture_output=True)
    for gtype in ("q8_0", "q4_0"):
        path = out[gtype] = cache / "gguf" / f"{size}-{gtype}.gguf"
        if not path.exists():
            subprocess.run([str(bin_dir / "llama-quantize"), "--pure", str(out["f32"]), str(path), gtype.upper()],
                           check=True, capture_output=True)
    return out


def gguf_step_bytes(path: Path, src: Path) -> int:
    """Bytes of the GGUF's tensors but the embedding table (a step reads one row of it)."""
    sys.path.insert(0, str(src / "gguf-py"))
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prompt: int, gen: int) -> float:
    """Tokens/s, or NaN when llama-bench fails (said on stdout: the other figures still count)."""
    res = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
                          "-n", str(gen), "-r", "1", "-o", "json"], capture_output=True, text=True)
    if res.returncode != 0:
        print(f"  llama-bench {gguf.name} -p {prompt} -n {gen} failed (exit status {res.returncode})", flush=True)
        return float("nan")
    return float(json.loads(res.stdout)[0]["avg_ts"])


def llama_greedy_text(bin_dir: Path, gguf: Path, n: int) -> str:
    res = subprocess.run([str(bin_dir / "llama-simple"), "-m", str(gguf), "-n", str(n), PROMPT],
                         check=True, capture_output=True)
    return res.stdout.decode("utf-8", errors="replace")


# --- ours ----------------------------------------------------------------------------------------


def ensure_checkpoints(cache: Path, size: str) -> tuple[Path, Path]:
    """The same random fp32 model in both formats; the HF copy with the tokenizer as `tokenizer.model`."""
    ours, hf = random_checkpoints(cache / "models", size)
    if not (hf / "tokenizer.model").exists():
        shutil.copyfile(hf / "tokenizer.model.v3", hf / "tokenizer.model")
    return ours, hf


def our_decode(engine: Engine, prompt: list[int], n: int) -> tuple[float, list[int]]:
    stamps = stamp_tokens(engine, prompt, n)
    return (n - 1) / (stamps[-1][0] - stamps[0][0]), [token for _, token in stamps]


def our_prefill(model, tokens: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        model(tokens, last_only=True)
        return tokens.shape[1] / (time.perf_counter() - start)


def quality(folder: Path, positions: int = 256) -> None:
    """Each quantization against fp32 over `positions` random tokens: max |Δlogit| / max |logit|,
    top-1 agreement, mean KL(fp32 ‖ quantized) (activations fp32), on both paths of the quantized
    layers: a prefill (one forward: dequantize-then-GEMM) and decode (one position a step: the
    mat-vec kernels, which on the CPU also round the activations to int8)."""
    import torch.nn.functional as F

    with torch.inference_mode():
        ref_model = load_model(folder, dtype="float32", max_seq_len=positions, quiet=True)
        tokens = torch.randint(0, ref_model.args.vocab_size, (1, positions), generator=torch.Generator().manual_seed(0))
        ref = ref_model(tokens)[0]
        for spec in ("int8", "int4", "int4-128"):
            model = load_model(folder, dtype="float32", quantize=spec, kernels="auto", max_seq_len=positions, quiet=True)
            cache = model.new_cache(1, positions)
            stepwise = torch.cat([model(tokens[:, i:i + 1], torch.tensor([i]), cache)[0] for i in range(positions)])
            for path, out in (("prefill", model(tokens)[0]), ("decode", stepwise)):
                rel = ((out - ref).abs().max() / ref.abs().max()).item()
                top1 = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
                kl = F.kl_div(out.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1).mean()
                print(f"| {spec} vs fp32, {path} | {rel:.3f} | {100 * top1:.1f}% | {kl.item():.1e} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "mistral-llamacpp")
    p.add_argument("--size", default="0.5b", choices=["small", "0.5b"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--quant-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kernels", default="auto", choices=["auto", "cpu", "torch"],
                   help="our ops backend (auto: the CPU kernels where they build, as `mistral` and the Python API)")
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--quality", action="store_true", help="only the error of each quantization against fp32")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {cpu_name()}, torch {torch.__version__}, "
          f"{a.threads} threads; load average {os.getloadavg()}", flush=True)

    if a.quality:
        quality(ensure_checkpoints(a.cache, a.size)[0])
        return 0
    bin_dir, src = ensure_llamacpp(a.cache)
    ours_folder, hf_folder = ensure_checkpoints(a.cache, a.size)
    ggufs = ensure_ggufs(a.cache, a.size, hf_folder, bin_dir, src)
    tokenizer = Tokenizer.from_path(ours_folder)
    prompt = tokenizer.encode(PROMPT, bos=True)
    seq = max(a.prefill, len(prompt) + a.decode) + 8

    models, engines, eager = {}, {}, {}
    for label in a.precisions:
        dtype, quantize, _ = PRECISIONS[label]
        models[label] = load_model(ours_folder, dtype=dtype or a.quant_dtype, quantize=quantize, kernels=a.kernels,
                                   max_seq_len=seq, quiet=True)
        engines[label] = Engine(models[label], max_batch=1, max_seq_len=seq, eos_id=tokenizer.eos_id, compile=True)
        eager[label] = Engine(models[label], max_batch=1, max_seq_len=seq, eos_id=tokenizer.eos_id, compile=False)
        start = time.perf_counter()
        our_decode(engines[label], prompt, 8)  # compiles
        print(f"ours {label}: compiled the decode step in {time.perf_counter() - start:.0f} s", flush=True)

    status = 0
    if "fp32" in engines:  # same weights, same answer
        _, ours = our_decode(engines["fp32"], prompt, 32)
        theirs = llama_greedy_text(bin_dir, ggufs["f32"], 32).strip().removeprefix("<s>").strip()  # it prints BOS
        mine = tokenizer.decode(prompt + ours).strip()
        same = mine == theirs
        print(f"greedy 32 tokens, fp32: llama.cpp's text {'equals' if same else 'DIFFERS FROM'} ours", flush=True)
        if not same:
            print(f"  ours:      {mine!r}\n  llama.cpp: {theirs!r}")
            status = 1

    probes = [models[label] for label in ("fp32", "bf16") if label in models] or \
        [load_model(ours_folder, dtype="bfloat16", max_seq_len=1, quiet=True)]  # only quantized precisions asked
    bandwidth = max(max(matvec_bandwidth(model).values()) for model in probes)
    best: dict[tuple[str, str, str], float] = {}
    tokens = torch.randint(0, tokenizer.vocab_size, (1, a.prefill), generator=torch.Generator().manual_seed(0))
    for r in range(a.rounds):
        print(f"round {r + 1}/{a.rounds}: load average {os.getloadavg()}", flush=True)
        for label in a.precisions:
            gguf = ggufs[PRECISIONS[label][2]]
            figures = {
                ("decode", "ours"): lambda: our_decode(engines[label], prompt, a.decode)[0],
                ("decode", "ours eager"): lambda: our_decode(eager[label], prompt, a.decode)[0],
                ("decode", "llama.cpp"): lambda: llama_bench(bin_dir, gguf, a.threads, 0, a.decode),
                ("prefill", "ours"): lambda: our_prefill(models[label], tokens),
                ("prefill", "llama.cpp"): lambda: llama_bench(bin_dir, gguf, a.threads, a.prefill, 0),
            }
            for (phase, who), run in figures.items():
                key = (label, phase, who)
                rate = run()
                print(f"  {label} {phase} {who}: {rate:.1f} tok/s", flush=True)
                best[key] = max(best.get(key, 0.0), rate) if rate == rate else best.get(key, float("nan"))

    print(f"\nmat-vec bandwidth (fastest fp32/bf16 way here): {bandwidth / 1e9:.1f} GB/s; "
          f"load average at the end {os.getloadavg()}\n")
    print(f"| precision (ours / llama.cpp) | decode {a.decode}: ours compiled | ours eager | llama.cpp "
          f"| compiled / llama.cpp | eager / llama.cpp | prefill {a.prefill}: ours | llama.cpp | ours / llama.cpp |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in a.precisions:
        gtype = PRECISIONS[label][2]
        floor_ours = bandwidth / weight_bytes_per_token(models[label])
        floor_theirs = bandwidth / gguf_step_bytes(ggufs[gtype], src)
        d_ours, d_theirs = best[(label, "decode", "ours")], best[(label, "decode", "llama.cpp")]
        d_eager = best[(label, "decode", "ours eager")]
        p_ours, p_theirs = best[(label, "prefill", "ours")], best[(label, "prefill", "llama.cpp")]
        print(f"| {label} / {gtype} | {d_ours:.1f} tok/s ({100 * d_ours / floor_ours:.0f}% of floor) "
              f"| {d_eager:.1f} | {d_theirs:.1f} ({100 * d_theirs / floor_theirs:.0f}%) | {d_ours / d_theirs:.2f}x "
              f"| {d_eager / d_theirs:.2f}x "
              f"| {p_ours:.0f} | {p_theirs:.0f} | {p_ours / p_theirs:.2f}x |")
    return status


if __name__ == "__main__":
    sys.exit(main())
