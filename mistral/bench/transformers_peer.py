"""transformers' `MistralForCausalLM` as `mistral bench`'s peer: the same weights, our tensors shared.

transformers is a test oracle and a benchmark peer, never a dependency of the runtime: every
function here imports it when called, so that loading `mistral bench` imports none of it
(tests/test_bench.py checks) and only the rows that compare with it need it installed.
"""

from __future__ import annotations

import contextlib

import torch

from ..loader import mistral_to_hf_name, to_hf_layout
from ..model import Transformer
from .steps import CORRECT_PROMPT, converted
from .timing import best_time, time_limit


def transformers_model(model: Transformer):
    """transformers' MistralForCausalLM holding our tensors (sdpa attention). wq and wk are copied,
    their rows permuted for its rotate-half rotary layout; every other weight is shared."""
    from transformers import MistralConfig, MistralForCausalLM

    args, device = model.args, model.output.weight.device
    config = MistralConfig(**args.to_hf_config(), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = MistralForCausalLM(config)
    state = {}
    for name, t in model.state_dict().items():
        state[mistral_to_hf_name(name)] = to_hf_layout(name, t, args)
    hf.load_state_dict(state, strict=True, assign=True)
    # Buffers computed at construction (the rotary inverse frequencies) were made on the meta device.
    for name, module in list(hf.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            parent = hf.get_submodule(name.rsplit(".", 1)[0]) if "." in name else hf
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(hf.config).to(device))
    hf.requires_grad_(False)
    return hf.eval()


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
