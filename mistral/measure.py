"""What `mistral bench` measures with: timers, the two ceilings, the models, and the decode loops.

mistral/bench.py runs these and writes the table; each piece here measures one thing and returns a
number (or builds a model), without printing.
"""

from __future__ import annotations

import contextlib
import math
import platform
import signal
import time
from typing import Callable

import torch

from .args import ModelArgs
from .engine import _bucket  # the engine's own rounding of the attention length
from .loader import mistral_to_hf_name, permute_for_hf


def cpu_name() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (or what `platform` knows elsewhere)."""
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
from .model import KVCache, Transformer
from .ops import get_ops

CORRECT_PROMPT, CORRECT_STEPS = 48, 8  # the correctness check: prompt length, teacher-forced decode steps


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
    return model.use_ops(get_ops(kernels, device)).eval()


def converted(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of `model` in another dtype (the fp32 reference), on the same device."""
    device = model.output.weight.device
    with torch.device("meta"):
        copy = Transformer(model.args, max_seq_len=model.max_seq_len)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, strict=True, assign=True)
    copy.requires_grad_(False)
    copy.init_freqs(device)
    return copy.use_ops(get_ops("torch", device)).eval()


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


# ---------------------------------------------------------------------------------------------
# Decoding without host syncs, eager or from a CUDA graph; the logits the correctness check compares
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
