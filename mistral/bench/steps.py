"""The steps `mistral bench` times: greedy decode steps with no host sync (eager, or replayed
from a CUDA graph), a chunked prefill, and the fast path's logits its correctness check compares.
"""

from __future__ import annotations

import torch

from ..engine import attention_length  # the engine's own rounding of the attention length
from ..model import KVCache, Transformer
from ..ops import get_ops
from .timing import best_time

CORRECT_PROMPT, CORRECT_STEPS = 48, 8  # the correctness check: prompt length, teacher-forced decode steps


def converted(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of `model` in another dtype (the fp32 reference), on the same device."""
    device = model.output.weight.device
    with torch.device("meta"):
        copy = Transformer(model.args, max_seq_len=model.max_seq_len)
    copy.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()}, strict=True, assign=True)
    copy.requires_grad_(False)
    copy.init_freqs(device)
    return copy.use_ops(get_ops("torch", device)).eval()


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
            from ..cuda_graphs import CapturedSteps

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
    dec = Decoder(model, cache, batch, graph, length=attention_length(ctx + steps + warmup, cache.max_seq_len))
    first = torch.randint(0, model.args.vocab_size, (batch,), device=device)
    dec.start(first, ctx)
    for _ in range(warmup):  # compiles kernels, captures the graph
        dec.step()
    seconds = best_time(lambda: [dec.step() for _ in range(steps)], device, runs, setup=lambda: dec.start(first, ctx))
    return batch * steps / seconds


def fast_logits(model: Transformer, tokens: torch.Tensor, graph: bool) -> torch.Tensor:
    """Logits of the last prompt position (prefill) and of CORRECT_STEPS teacher-forced decode steps,
    [STEPS + 1, V] fp32, through the same Decoder the speed runs use (a CUDA graph when `graph`)."""
    device = tokens.device
    cache = model.new_cache(1, attention_length(tokens.shape[1] + 16, model.max_seq_len))
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
