"""`mistral bench`: how fast this machine generates, next to its memory-bandwidth floor and transformers.

    python -m mistral.cli bench [--quick] [--json bench.json]          # on a CUDA GPU: full-size v0.3
    mistral bench --preset small --device cpu --quick                 # the same table on a CPU (CI)

The model is built in memory with random bf16 weights (the real shapes; nothing is downloaded or
read from disk) and kept for the whole run; transformers' `MistralForCausalLM` is built around the
same weight tensors (only wq and wk are copied, with their rows permuted to its rotate-half layout),
so both run the same model. Every figure is measured in this run:

  copy bandwidth    `dst.copy_(src)` of 1 GiB on the device, bytes read + written per second.
  matmul rate       an 8192³ bf16 matrix product (1024³ on a CPU), FLOP/s.
  floor             at batch 1 a decode step reads every weight (all but the embedding table, of
                    which it reads one row) and the visible KV cache once: floor tokens/s = copy
                    bandwidth / those bytes (or the matmul rate, where FLOPs take longer).
  correctness       logits of 8 decode steps after a 48-token prompt: ours in bf16 on the fast path
                    (Triton + CUDA graph on a GPU; PyTorch on a CPU) and transformers in bf16, each
                    against our fp32 PyTorch path; our fp32 against transformers' fp32. The error is
                    max |a - b| / max |b|.
  decode            greedy, batch 1, from context 128 and 4096 (the cache filled by a real prefill),
                    N steps timed after warm-up, tokens fed back on the device with no host sync:
                    torch eager (mistral/model.py's PyTorch ops), Triton (kernels/), Triton + CUDA
                    graph (mistral/cuda_graphs.py), the same with merged wq|wk|wv and w1|w3;
                    transformers eager (sdpa attention, DynamicCache) and, on CUDA, transformers with
                    a StaticCache and torch.compile(mode="reduce-overhead") (its documented recipe).
  engine            batch 1 through `Engine` (streams each token to the host: one sync per step).
  prefill           one 2048-token prompt, batch 1: tokens/s and TFLOP/s (matmuls + causal
                    attention, as `describe.prefill_cost` counts them); time to first token through
                    the engine (prompt ids in, first sampled id out on the host).
  batched decode    batch 8 and 64, context 128, tokens/s summed over the rows.
  memory            peak memory allocated on the GPU (peak RSS on a CPU).

A figure that cannot be measured here says so ("n/a (needs CUDA)"); a step that fails is recorded
as an error in its row and the run goes on.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import platform
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .args import ModelArgs, preset
from .describe import GPU, decode_cost, prefill_cost
from .engine import Engine, GenerationParams, TokenEvent, _bucket  # _bucket: the engine's own cache-length rounding
from .loader import mistral_to_hf_name, permute_for_hf
from .model import KVCache, Transformer

NA_CUDA = "n/a (needs CUDA)"
CORRECT_PROMPT, CORRECT_STEPS = 48, 8


@dataclass
class Row:
    key: str  # stable name, for the JSON and the tests
    section: str
    label: str
    value: float | None
    unit: str
    note: str = ""


class Report:
    """The table, filled as the run goes; every step logs its progress to stderr."""

    def __init__(self, json_path=None):
        self.rows: list[Row] = []
        self.meta: dict = {}
        self.started = time.perf_counter()
        self.json_path = json_path  # rewritten after every row, so that a run cut short keeps its figures

    def log(self, message: str) -> None:
        print(f"[bench {time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    def add(self, key, section, label, value, unit, note="") -> Row:
        row = Row(key, section, label, None if value is None else float(value), unit, note)
        self.rows.append(row)
        shown = "-" if value is None else f"{value:,.4g} {unit}"
        self.log(f"{label}: {shown} {note}")
        self.save()
        return row

    def save(self) -> None:
        """The JSON at json_path, and the table beside it (.md)."""
        if self.json_path is not None:
            path = Path(self.json_path)
            path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
            path.with_suffix(".md").write_text(self.table() + "\n")

    def value(self, key: str) -> float | None:
        return next((r.value for r in self.rows if r.key == key), None)

    @contextlib.contextmanager
    def guard(self, key: str, section: str, label: str):
        """Run a step; if it fails, record the error in its row and go on with the next step."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - one failed figure must not cost the others
            traceback.print_exc(file=sys.stderr)
            self.add(key, section, label, None, "", f"error: {type(e).__name__}: {str(e)[:300]}")

    def table(self) -> str:
        lines = [f"# mistral bench: {self.meta.get('model')} on {self.meta.get('device_name')}, {self.meta.get('date')}",
                 f"# torch {self.meta.get('torch')}, triton {self.meta.get('triton')}, "
                 f"transformers {self.meta.get('transformers')}, {self.meta.get('dtype')}",
                 "", "| figure | value | what it measured; what limits it |", "|---|---|---|"]
        order = list(dict.fromkeys(r.section for r in self.rows))
        section = None
        for r in sorted(self.rows, key=lambda r: order.index(r.section)):  # stable: rows keep their order
            if r.section != section:
                section = r.section
                lines.append(f"| **{section}** | | |")
            value = "-" if r.value is None else f"{_fmt(r.value)} {r.unit}"
            lines.append(f"| {r.label} | {value} | {r.note} |")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}


def _fmt(v: float) -> str:
    if v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------
# Timing and the two ceilings
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, runs: int, setup: Callable[[], object] | None = None) -> float:
    """Seconds of one call of fn, the best of `runs` (each after `setup`, untimed)."""
    best = math.inf
    for _ in range(runs):
        if setup is not None:
            setup()
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(device: torch.device, quick: bool) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and bytes written."""
    n = 2**30 if device.type == "cuda" else 2**27
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()  # not zeros: a fair input
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = best_time(lambda: [dst.copy_(src) for _ in range(5)], device, 3 if quick else 10) / 5
    return 2 * n / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, quick: bool) -> float:
    """FLOP/s of a large square matrix product."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b
    seconds = best_time(lambda: [a @ b for _ in range(5)], device, 3 if quick else 10) / 5
    return 2 * n**3 / seconds


# ---------------------------------------------------------------------------------------------
# The models: ours with random weights, and transformers' around the same tensors
# ---------------------------------------------------------------------------------------------


def random_model(args: ModelArgs, device: torch.device, dtype: torch.dtype, max_seq_len: int, seed: int = 0,
                 kernels: str = "torch") -> Transformer:
    """The model with random weights made directly on `device` (the same distribution as make-random:
    N(0, 0.02²) matrices, norm weights near 1)."""
    with torch.device("meta"):
        model = Transformer(args, max_seq_len=max_seq_len)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        t = torch.empty(p.shape, device=device, dtype=dtype)
        state[name] = t.normal_(1.0, 0.1, generator=gen) if name.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=gen)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(False)
    model.init_freqs(device)
    return model.use_kernels(kernels).eval()


def converted(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of `model` in another dtype (the fp32 reference), on the same device."""
    device = model.output.weight.device
    with torch.device("meta"):
        copy = Transformer(model.args, max_seq_len=model.max_seq_len)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, strict=True, assign=True)
    copy.requires_grad_(False)
    copy.init_freqs(device)
    return copy.use_kernels("torch").eval()


def transformers_model(model: Transformer):
    """transformers' MistralForCausalLM holding our tensors (sdpa attention). wq and wk are copied,
    their rows permuted for its rotate-half rotary layout; every other weight is shared."""
    from transformers import MistralConfig, MistralForCausalLM

    args, device = model.args, model.output.weight.device
    config = MistralConfig(**args.to_hf_config())
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = MistralForCausalLM(config)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = permute_for_hf(t, args.n_heads if name.endswith("wq.weight") else args.n_kv_heads)
        state[mistral_to_hf_name(name)] = t
    hf.load_state_dict(state, strict=True, assign=True)
    # Buffers computed at construction (the rotary inverse frequencies) were made on the meta device.
    for name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(hf.config).to(device))
    hf.requires_grad_(False)
    return hf.eval()


@contextlib.contextmanager
def unmerged(model: Transformer):
    """Run the three (and two) separate matmuls of unmerged projections, over the same storage."""
    saved = [(layer.attention.wqkv, layer.feed_forward.w13) for layer in model.layers]
    for layer in model.layers:
        layer.attention.wqkv = layer.feed_forward.w13 = None
    try:
        yield model
    finally:
        for layer, (wqkv, w13) in zip(model.layers, saved):
            layer.attention.wqkv, layer.feed_forward.w13 = wqkv, w13


# ---------------------------------------------------------------------------------------------
# Decoding without host syncs, eager or from a CUDA graph
# ---------------------------------------------------------------------------------------------


class Decoder:
    """Greedy decode steps for rows 0..batch-1 of a cache, with no host sync: the step reads its
    input tokens and positions from fixed tensors and writes the argmax back into them, so it runs
    the same eagerly or replayed from a CUDA graph (which reads the whole cache length: the Triton
    decode kernel only visits each row's own positions). Eager steps read `length` positions."""

    def __init__(self, model: Transformer, cache: KVCache, batch: int, graph: bool, length: int | None = None):
        device = model.output.weight.device
        self.model, self.batch = model, batch
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.view = cache.view(0, batch) if graph else cache.view(0, batch, length=length)
        self.graphs = None
        if graph:
            from .cuda_graphs import CapturedSteps

            self.graphs = CapturedSteps(self._step, batch)

    def _step(self, batch: int, key=None) -> tuple[torch.Tensor]:
        logits = self.model(self.tokens[:, None], self.pos, self.view)[:, -1]  # [batch, V]
        self.tokens.copy_(logits.argmax(-1))
        self.pos.add_(1)
        return (logits,)

    def step(self) -> torch.Tensor:
        """One step; its logits [batch, V] (a graph's output: overwritten by the next step)."""
        if self.graphs is None:
            return self._step(self.batch)[0]
        out = self.graphs(self.batch)
        if out is None:
            raise RuntimeError(f"CUDA graph capture failed: {self.graphs.disabled}")
        return out[0]

    def start(self, tokens: torch.Tensor, pos: int) -> None:
        self.tokens.copy_(tokens)
        self.pos.fill_(pos)


def prefill(model: Transformer, cache: KVCache, tokens: torch.Tensor, chunk: int = 1024) -> None:
    """Write the keys and values of tokens [B, T] at positions 0..T-1, in chunks (bounded memory)."""
    B, T = tokens.shape
    for start in range(0, T, chunk):
        stop = min(T, start + chunk)
        pos = torch.full((B,), start, dtype=torch.long, device=tokens.device)
        model(tokens[:, start:stop], pos, cache.view(0, B, length=stop), last_only=True)


def decode_rate(model: Transformer, cache: KVCache, batch: int, ctx: int, steps: int, warmup: int,
                runs: int, graph: bool) -> float:
    """Tokens/s of `steps` greedy steps for `batch` rows from position ctx (cache filled up to there)."""
    device = model.output.weight.device
    dec = Decoder(model, cache, batch, graph, length=_bucket(ctx + steps + warmup, cache.max_seq_len))
    first = torch.randint(0, model.args.vocab_size, (batch,), device=device)
    dec.start(first, ctx)
    for _ in range(warmup):  # compiles kernels, captures the graph
        dec.step()
    seconds = best_time(lambda: [dec.step() for _ in range(steps)], device, runs, setup=lambda: dec.start(first, ctx))
    return batch * steps / seconds


# --- transformers ------------------------------------------------------------------------------


def hf_eager_rate(hf, prompt: torch.Tensor, steps: int, warmup: int, runs: int) -> float:
    """Tokens/s of greedy steps of transformers' eager forward with its DynamicCache (batch 1),
    after a prefill of `prompt`; the argmax stays on the device, as in ours."""
    from transformers import DynamicCache

    device = prompt.device
    cache = DynamicCache()
    out = hf(input_ids=prompt, past_key_values=cache, use_cache=True)
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    ctx = prompt.shape[1]

    def run(n: int) -> None:
        token = first
        for _ in range(n):
            token = hf(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

    def rewind() -> None:  # back to the prompt, so that every run decodes the same positions
        extra = cache.get_seq_length() - ctx
        if extra > 0:
            cache.crop(-extra)  # a negative argument removes that many positions (transformers 4 and 5)

    run(warmup)
    seconds = best_time(lambda: run(steps), device, runs, setup=rewind)
    return steps / seconds


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise Timeout in the main thread after `seconds` (SIGALRM; a no-op elsewhere)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise Timeout(f"over its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def hf_compiled_rates(hf, prompts: dict[int, torch.Tensor], steps: int, warmup: int, runs: int, budget_s: int) -> dict[int, float]:
    """transformers' documented fast path: a StaticCache and the one-token decode step compiled with
    torch.compile(mode="reduce-overhead", fullgraph=True); the prefill runs eagerly. Tokens/s per context."""
    from transformers import StaticCache

    device = next(hf.parameters()).device
    max_len = max(p.shape[1] for p in prompts.values()) + warmup + steps + 8
    try:  # transformers >= 5
        cache = StaticCache(config=hf.config, max_cache_len=max_len)
    except TypeError:  # 4.x
        cache = StaticCache(config=hf.config, max_batch_size=1, max_cache_len=max_len, device=device, dtype=hf.dtype)

    def decode_one(token, cache_position):
        logits = hf(input_ids=token, position_ids=cache_position[None], cache_position=cache_position,
                    past_key_values=cache, use_cache=True, return_dict=False)[0]
        return logits[:, -1].argmax(-1, keepdim=True)

    compiled = torch.compile(decode_one, mode="reduce-overhead", fullgraph=True)
    rates = {}
    for i, (ctx, prompt) in enumerate(prompts.items()):
        if i:
            cache.reset()
        hf(input_ids=prompt, cache_position=torch.arange(ctx, device=device), past_key_values=cache, use_cache=True)
        first = torch.zeros(1, 1, dtype=torch.long, device=device)

        def run(n: int, start: int) -> None:
            token = first
            for step in range(n):
                token = compiled(token, torch.tensor([start + step], device=device)).clone()

        with time_limit(budget_s):  # the first call compiles (and later ones capture the graph)
            run(warmup, ctx)
        rates[ctx] = steps / best_time(lambda: run(steps, ctx), device, runs)
    return rates


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run(a) -> Report:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    preset_name = a.preset or ("7b-v0.3" if cuda else "small")
    args = preset(preset_name)
    dtype = torch.bfloat16
    quick = a.quick
    steps, warmup, runs = (a.steps or (16 if quick else 128)), (2 if quick else 8), (1 if quick else 2)
    if not cuda:
        steps = a.steps or 4
    contexts = (128, 4096)
    R = Report(a.json)
    R.meta = _environment(device, preset_name, args, dtype, steps)
    R.save()
    R.log(f"{preset_name} on {R.meta['device_name']}; {steps} decode steps per figure")
    gen = torch.Generator(device="cpu").manual_seed(0)

    def randint(*shape) -> torch.Tensor:
        return torch.randint(0, args.vocab_size, shape, generator=gen).to(device)

    S = "the machine"
    with R.guard("copy_bandwidth", S, "copy bandwidth"):
        bw = copy_bandwidth(device, quick)
        R.add("copy_bandwidth", S, "copy bandwidth", bw / 1e9, "GB/s",
              f"{'1 GiB' if cuda else '128 MiB'} device-to-device copy, bytes read + written")
    with R.guard("matmul_rate", S, "bf16 matmul rate"):
        n = 8192 if cuda else 1024
        R.add("matmul_rate", S, "bf16 matmul rate", matmul_rate(device, dtype, quick) / 1e12, "TFLOP/s", f"{n}³ matrix product")
    bw, flops = (R.value("copy_bandwidth") or math.nan) * 1e9, (R.value("matmul_rate") or math.inf) * 1e12
    measured = GPU("measured", bw, flops, "this run")  # a NaN bandwidth makes every floor NaN: "n/a" below
    weights = decode_cost(args, 1).bytes
    for ctx in contexts:
        cost = decode_cost(args, ctx + 1)
        R.add(f"floor.b1.ctx{ctx}", S, f"floor, batch 1, context {ctx}", 1 / cost.floor_s(measured), "tok/s",
              f"{cost.bytes / 1e9:.3g} GB read per step ({weights / 1e9:.3g} GB of weights + KV) / copy bandwidth")

    R.log("building the model with random weights")
    max_len = max(contexts) + steps + warmup + 64
    model = random_model(args, device, dtype, max_len, kernels="torch")
    model.merge_projections()  # the separate matmuls stay available over the same storage: see unmerged()
    fast = "triton" if cuda else "torch"
    fast_label = "Triton + CUDA graph" if cuda else "PyTorch eager"
    hf = None
    with R.guard("hf.build", "correctness", "transformers model"):
        hf = transformers_model(model)

    # --- correctness ------------------------------------------------------------------------------
    S = "correctness"
    tokens = randint(1, CORRECT_PROMPT + CORRECT_STEPS)
    want = None  # our fp32 logits: the reference
    with R.guard("correct.fp32_vs_transformers", S, "ours fp32 vs transformers fp32"):
        want, hf_want = fp32_references(model, tokens)
        err = rel_err(want, hf_want)
        R.add("correct.fp32_vs_transformers", S, "ours fp32 vs transformers fp32", err, "",
              "max rel. error, the same weights in fp32 (no tf32); tolerance 1e-4" + _verdict(err <= 1e-4))
    _free(device)
    with R.guard("correct.ours_vs_fp32", S, f"ours bf16 ({fast_label}) vs our fp32"):
        if want is None:
            raise RuntimeError("no fp32 reference (see the row above)")
        model.use_kernels(fast)
        got = fast_logits(model, tokens, graph=cuda)
        model.use_kernels("torch")
        hf_err = None
        if hf is not None:
            with torch.inference_mode():
                hf_got = hf(tokens).logits[0, CORRECT_PROMPT - 1 :].float()
            hf_err = rel_err(hf_got, want)
            R.add("correct.transformers_vs_fp32", S, "transformers bf16 vs our fp32", hf_err, "",
                  "max rel. error: what bf16 rounding costs a correct implementation")
        err = rel_err(got, want)
        tol = max(2 * hf_err, 1e-2) if hf_err is not None else 5e-2
        R.add("correct.ours_vs_fp32", S, f"ours bf16 ({fast_label}) vs our fp32", err, "",
              f"max rel. error, last prompt position + {CORRECT_STEPS} decode steps; tolerance {tol:.3g} "
              f"(2x transformers' bf16 error, at least 0.01)" + _verdict(err <= tol))
        if hf is not None:
            R.add("correct.ours_vs_transformers", S, "ours bf16 vs transformers bf16", rel_err(got, hf_got), "",
                  "max rel. error; no tolerance of its own: both round to bf16, differently")
    peak_correctness = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    # --- decode at batch 1 ------------------------------------------------------------------------
    S = "decode, batch 1"
    cache = model.new_cache(1, max_len)
    variants = [("torch", "ours, torch eager", "torch", False, False),
                ("triton", "ours, Triton", "triton", False, False),
                ("triton_graph", "ours, Triton + CUDA graph", "triton", True, False),
                ("triton_graph_merged", "ours, Triton + CUDA graph + merged projections", "triton", True, True)]
    for ctx in contexts:
        R.log(f"prefill of {ctx} tokens for the decode runs")
        prompt = randint(1, ctx)
        with torch.inference_mode():
            model.use_kernels(fast)
            prefill(model, cache, prompt)
        floor = R.value(f"floor.b1.ctx{ctx}")
        for key, label, kernels, graph, merged in variants:
            key = f"decode.b1.ctx{ctx}.{key}"
            label = f"{label}, context {ctx}"
            if (kernels == "triton" or graph) and not cuda:
                R.add(key, S, label, None, "", NA_CUDA)
                continue
            with R.guard(key, S, label), torch.inference_mode():
                model.use_kernels(kernels)
                with (contextlib.nullcontext() if merged else unmerged(model)):
                    rate = decode_rate(model, cache, 1, ctx, steps, warmup, runs, graph)
                R.add(key, S, label, rate, "tok/s", _of_floor(rate, floor))
        key = f"decode.b1.ctx{ctx}.transformers"
        with R.guard(key, S, f"transformers eager, context {ctx}"), torch.inference_mode():
            if hf is None:
                raise RuntimeError("no transformers model")
            rate = hf_eager_rate(hf, prompt, steps, warmup, 1)
            R.add(key, S, f"transformers eager, context {ctx}", rate, "tok/s",
                  f"MistralForCausalLM, sdpa, DynamicCache; {_of_floor(rate, floor)}")
        _free(device)
    model.use_kernels(fast)
    _decode_targets(R, cuda)

    # --- prefill and time to first token -------------------------------------------------------------
    S = "prefill, 2048 tokens"
    n_prefill = 2048
    prompt = randint(1, n_prefill)
    cost = prefill_cost(args, n_prefill)
    for kernels in (["triton", "torch"] if cuda else ["torch"]):
        key, label = f"prefill.{kernels}", f"ours, {'Triton' if kernels == 'triton' else 'torch eager'}"
        with R.guard(key, S, label), torch.inference_mode():
            model.use_kernels(kernels)
            view = cache.view(0, 1, length=n_prefill)
            zero = torch.zeros(1, dtype=torch.long, device=device)
            model(prompt, zero, view, last_only=True)  # warm-up
            seconds = best_time(lambda: model(prompt, zero, view, last_only=True), device, runs + 1)
            R.add(key, S, f"{label}: tokens/s", n_prefill / seconds, "tok/s", f"{seconds * 1e3:.1f} ms for the prompt")
            R.add(key + ".tflops", S, f"{label}: TFLOP/s", cost.flops / seconds / 1e12, "TFLOP/s",
                  f"{cost.flops / 1e12:.3g} TFLOP (matmuls + causal attention); "
                  f"{100 * cost.flops / seconds / flops:.0f}% of the measured matmul rate"
                  + (_target(cuda, cost.flops / seconds >= 0.6 * flops, "target >= 60%") if kernels == fast else ""))
    model.use_kernels(fast)
    with R.guard("ttft", S, "time to first token"), torch.inference_mode():
        engine = Engine(model, max_batch=1, max_seq_len=n_prefill + 16)
        ids = prompt[0].tolist()
        first_token_s = []
        for _ in range(runs + 1):  # the first is a warm-up
            stamps = []
            start = time.perf_counter()
            engine.add(ids, GenerationParams(max_tokens=1, temperature=0.0),
                       lambda e: stamps.append(time.perf_counter()) if isinstance(e, TokenEvent) else None)
            while engine.has_work():
                engine.step()
            first_token_s.append(stamps[0] - start)
        ttft = min(first_token_s[1:])
        R.add("ttft", S, "time to first token", ttft * 1e3, "ms",
              f"{n_prefill}-token prompt through Engine ({'Triton' if cuda else 'PyTorch'} prefill): "
              "prompt ids in, first sampled id on the host")
        del engine

    # --- the engine, streaming ------------------------------------------------------------------------
    S = "engine"
    with R.guard("engine.b1", S, "Engine, batch 1, streaming"), torch.inference_mode():
        engine = Engine(model, max_batch=1, max_seq_len=256 + steps + warmup)
        stamps: list[float] = []
        ids = randint(128).tolist()

        def emit(e):
            if isinstance(e, TokenEvent):
                stamps.append(time.perf_counter())

        for n in (warmup + 1, steps + 1):  # a warm-up (graph capture), then the timed run
            stamps.clear()
            engine.add(ids, GenerationParams(max_tokens=n, temperature=0.0, ignore_eos=True), emit)
            while engine.has_work():
                engine.step()
        rate = steps / (stamps[-1] - stamps[0])
        graphs = "CUDA graphs" if engine.graphs is not None and engine.graphs.replays else "eager"
        R.add("engine.b1", S, "Engine, batch 1, context 128, streaming", rate, "tok/s",
              f"{graphs}; one host sync per token to stream it; {_of_floor(rate, R.value('floor.b1.ctx128'))}")
        del engine

    # --- batched decode -----------------------------------------------------------------------------
    S = "decode, batched (context 128)"
    for batch in (8, 64):
        bcache = None
        with contextlib.suppress(Exception):
            bcache = model.new_cache(batch, _bucket(128 + steps + warmup + 1, max_len))
        ctx = 128
        floor = batch / decode_cost(args, ctx + 1, batch).floor_s(measured)
        kinds = [("triton_graph_merged", "ours, Triton + CUDA graph + merged", True), ("triton", "ours, Triton", False)] \
            if cuda else [("torch", "ours, torch eager", False)]
        for name, label, graph in kinds:
            key, label = f"decode.b{batch}.{name}", f"{label}, batch {batch}"
            with R.guard(key, S, label), torch.inference_mode():
                if bcache is None:
                    raise RuntimeError("could not allocate the KV cache")
                prefill(model, bcache, randint(batch, ctx))
                with (contextlib.nullcontext() if graph else unmerged(model)):
                    rate = decode_rate(model, bcache, batch, ctx, steps, warmup, runs, graph)
                R.add(key, S, label, rate, "tok/s", f"summed over rows; {_of_floor(rate, floor)}")
        del bcache
        _free(device)

    # --- memory ----------------------------------------------------------------------------------------
    S = "memory"
    if cuda:
        R.add("memory.peak_correctness", S, "peak GPU memory, correctness check", peak_correctness, "GiB",
              "bf16 weights + an fp32 copy (the reference) + transformers' permuted wq/wk copies")
        R.add("memory.peak_speed", S, "peak GPU memory, speed runs", torch.cuda.max_memory_allocated(device) / 2**30, "GiB",
              "bf16 weights + KV caches (batch 64 the largest) + transformers' wq/wk copies and caches")
    else:
        import resource

        R.add("memory.peak_speed", S, "peak RSS of the process", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "GiB", "CPU run: the whole process")

    # --- transformers compiled, last: its compile time is the least predictable step ---------------------
    S = "decode, batch 1"
    for ctx in contexts:
        if not cuda or a.no_compile:
            reason = NA_CUDA + " (reduce-overhead is CUDA graphs)" if not cuda else "skipped (--no-compile)"
            R.add(f"decode.b1.ctx{ctx}.transformers_compiled", S, f"transformers static cache + compile, context {ctx}", None, "", reason)
    if cuda and not a.no_compile and hf is not None:
        R.log(f"compiling transformers' decode step (budget {a.compile_budget} s)")
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                prompts = {ctx: randint(1, ctx) for ctx in contexts}
                rates = hf_compiled_rates(hf, prompts, steps, warmup, runs, a.compile_budget)
            for ctx, rate in rates.items():
                R.add(f"decode.b1.ctx{ctx}.transformers_compiled", S, f"transformers static cache + compile, context {ctx}",
                      rate, "tok/s", f"StaticCache + torch.compile(mode='reduce-overhead'); compile and capture took "
                      f"{time.perf_counter() - started:.0f} s in all; {_of_floor(rate, R.value(f'floor.b1.ctx{ctx}'))}")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            for ctx in contexts:
                R.add(f"decode.b1.ctx{ctx}.transformers_compiled", S, f"transformers static cache + compile, context {ctx}",
                      None, "", f"error: {type(e).__name__}: {str(e)[:200]}")
        ours = R.value("decode.b1.ctx128.triton_graph_merged")
        compiled = R.value("decode.b1.ctx128.transformers_compiled")
        if ours and compiled:
            R.add("ratio.vs_transformers_compiled", "targets (H100, bf16, batch 1, context 128)",
                  "ours / transformers compiled", ours / compiled, "x", "no target; for the record")
    if cuda:
        R.add("memory.peak_compiled", "memory", "peak GPU memory, speed runs + transformers compiled",
              torch.cuda.max_memory_allocated(device) / 2**30, "GiB", "adds its StaticCache and CUDA graph pool")
    R.log("done")
    return R


def fp32_references(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [STEPS + 1, V] of the last prompt position onwards, from an fp32 copy of the model on
    the PyTorch ops, and from transformers around that copy. Both are freed on return."""
    ref = converted(model, torch.float32)
    with _exact_fp32_matmuls():
        want = ref(tokens)[0, CORRECT_PROMPT - 1 :].float()
        hf_want = transformers_model(ref)(tokens).logits[0, CORRECT_PROMPT - 1 :].float()
    return want, hf_want


def fast_logits(model: Transformer, tokens: torch.Tensor, graph: bool) -> torch.Tensor:
    """Logits of the last prompt position (prefill) and of CORRECT_STEPS teacher-forced decode steps,
    [STEPS + 1, V] fp32, through the same Decoder the speed runs use (a CUDA graph when `graph`)."""
    device = tokens.device
    cache = model.new_cache(1, _bucket(tokens.shape[1] + 16, model.max_seq_len))
    with torch.inference_mode():
        out = [model(tokens[:, :CORRECT_PROMPT], torch.zeros(1, dtype=torch.long, device=device),
                     cache.view(0, 1, length=CORRECT_PROMPT), last_only=True)[0, -1].float()]
        dec = Decoder(model, cache, 1, graph, length=cache.max_seq_len)
        dec.start(tokens[:, CORRECT_PROMPT], CORRECT_PROMPT)
        dec.step()  # warm-up (captures the graph; writes the same keys and values the next step does)
        dec.start(tokens[:, CORRECT_PROMPT], CORRECT_PROMPT)
        for i in range(CORRECT_STEPS):
            dec.tokens.copy_(tokens[:, CORRECT_PROMPT + i])  # teacher forcing: the same inputs as the references
            out.append(dec.step()[0].float().clone())
    return torch.stack(out)


@contextlib.contextmanager
def _exact_fp32_matmuls():
    """The fp32 reference must not use tf32 tensor cores (10 mantissa bits)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _verdict(ok: bool) -> str:
    return ": PASS" if ok else ": FAIL"


def _target(cuda: bool, ok: bool, what: str) -> str:
    return f"; {what}: {'met' if ok else 'NOT met'}" + ("" if cuda else " (the targets are for an H100)")


def _of_floor(rate: float, floor: float | None) -> str:
    return f"{100 * rate / floor:.0f}% of the floor" if floor and math.isfinite(floor) else ""


def _decode_targets(R: Report, cuda: bool) -> None:
    S = "targets (H100, bf16, batch 1, context 128)"
    ours = R.value("decode.b1.ctx128.triton_graph_merged") if cuda else R.value("decode.b1.ctx128.torch")
    floor, hf = R.value("floor.b1.ctx128"), R.value("decode.b1.ctx128.transformers")
    if ours is None:
        R.add("target.floor", S, "ours / floor", None, "", NA_CUDA if not cuda else "no figure for ours")
        R.add("target.vs_transformers", S, "ours / transformers eager", None, "", NA_CUDA if not cuda else "no figure for ours")
        return
    R.add("target.floor", S, "ours / floor", 100 * ours / floor if floor else None, "%",
          f"{ours:.1f} tok/s" + _target(cuda, bool(floor) and ours >= 190 and ours >= 0.9 * floor, ">= 190 tok/s and >= 90%"))
    R.add("target.vs_transformers", S, "ours / transformers eager", ours / hf if hf else None, "x",
          "same weights, same run" + _target(cuda, bool(hf) and ours >= 4 * hf, ">= 4x"))


def _environment(device: torch.device, preset_name: str, args: ModelArgs, dtype: torch.dtype, steps: int) -> dict:
    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except Exception:  # noqa: BLE001
            return "not installed"

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        name = f"{name} (CPU, {torch.get_num_threads()} threads)"
    return {
        "model": f"{preset_name} ({args.n_layers} layers, dim {args.dim}), random weights",
        "preset": preset_name, "device": str(device), "device_name": name, "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers"),
        "python": platform.python_version(), "decode_steps": steps,
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def main(a) -> int:
    """`mistral bench` (arguments: see cli.py's add_bench)."""
    if a.steps is not None and a.steps < 1:
        raise ValueError(f"--steps must be positive, got {a.steps}")
    if a.preset is not None:
        preset(a.preset)  # a clear error for an unknown name
    if a.device is not None and torch.device(a.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is available here")
    report = run(a)  # writes --json (and the table beside it, .md) as it goes
    print(report.table())
    return 0
