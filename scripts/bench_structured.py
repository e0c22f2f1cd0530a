"""Benchmark: what constrained decoding costs per token, on this CPU.

Two measurements:

  mask fill   The grammar engine alone on the real v3 vocabulary (32768 tokens): the time to fill
              one row of the token mask, per token, along random walks through a JSON schema
              (strings, an integer, a boolean, an enum, an array), each token drawn uniformly from
              the ones the mask allows. llguidance (what mistral/structured.py uses), and xgrammar
              when it is installed, on the same walks' schema.
  decode      `Mistral` with compile=True (the CPU fast path), greedy, 128 new tokens per row, at
              batch 1 and 8: free text (EOS ignored) against a json_schema answer that cannot end
              before 128 tokens (a string of at least 600 characters). The decode phase only: from
              each row's first token to its last, best of --runs, free and constrained alternating.

    python scripts/bench_structured.py [--cache weights/bench] [--sizes small 0.5b] [--batches 1 8]

Random fp32 checkpoints are written under --cache if absent. Compilation (a graph per batch class
and per sampling feature set, the token mask being one) happens in a warm-up and is not timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import time
from pathlib import Path

import torch

from mistral import Mistral
from mistral.args import preset
from mistral.make_random import make_random, v3_tokenizer_file
from mistral.bench.timing import cpu_name
from mistral.tokenizer import Tokenizer

MESSAGES = [{"role": "user", "content": "Write a long story as JSON."}]
NEW_TOKENS = 128
LONG = {"type": "json_schema", "json_schema": {"name": "story", "strict": True, "schema": {
    "type": "object", "properties": {"story": {"type": "string", "minLength": 600, "maxLength": 2000}},
    "required": ["story"], "additionalProperties": False}}}
WALK_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "color", "tags"],
               "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                              "ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                              "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 4}}}


def allowed(row: torch.Tensor, vocab: int) -> list[int]:
    bits = ((row[:, None] >> torch.arange(32, dtype=torch.int32)) & 1).flatten()[:vocab]
    return bits.nonzero().flatten().tolist()


def walk(fill, consume, done, eos: int, rng: random.Random) -> list[float]:
    times = []
    while not done() and len(times) < 300:
        t0 = time.perf_counter()
        row = fill()
        times.append(time.perf_counter() - t0)
        choices = [t for t in allowed(row, 32768) if t != eos]
        if not choices:
            break
        consume(rng.choice(choices))
    return times


def mask_fill(walks: int) -> None:
    import llguidance
    from mistral import structured

    tok = Tokenizer.from_path(v3_tokenizer_file())
    results = {"llguidance": []}
    grammar = structured.response_format_grammar({"type": "json_schema", "json_schema": {"schema": WALK_SCHEMA}})
    lt = structured.llguidance_tokenizer(tok)
    mask = torch.full((1, 1024), -1, dtype=torch.int32)
    try:
        import xgrammar as xgr

        info = xgr.TokenizerInfo(structured.Vocabulary(tok).tokens, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                 stop_token_ids=[tok.eos_id])
        compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(WALK_SCHEMA), any_whitespace=False)
        results["xgrammar"] = []
    except ImportError:
        xgr = None
    for k in range(walks):
        m = llguidance.LLMatcher(lt, grammar)

        def fill():
            m.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            return mask[0]

        results["llguidance"] += walk(fill, m.consume_token, m.is_stopped, tok.eos_id, random.Random(k))
        if xgr is not None:
            g, bm = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, tok.vocab_size)

            def xfill():
                g.fill_next_token_bitmask(bm)
                return bm[0]

            results["xgrammar"] += walk(xfill, g.accept_token, g.is_terminated, tok.eos_id, random.Random(k))
    print("| engine | tokens | median µs | mean µs | p99 µs |\n|---|---|---|---|---|")
    for name, ts in results.items():
        ts = sorted(ts)
        print(f"| {name} | {len(ts)} | {ts[len(ts) // 2] * 1e6:.0f} | {sum(ts) / len(ts) * 1e6:.0f} | "
              f"{ts[int(len(ts) * 0.99)] * 1e6:.0f} |")


def decode_rate(llm: Mistral, batch: int, constrained: bool) -> float:
    """Tokens per second per row over the decode phase of `batch` rows."""
    params = dict(temperature=0, max_tokens=NEW_TOKENS)
    params.update(response_format=LONG) if constrained else params.update(ignore_eos=True)
    prompt, gen = llm.chat_request(MESSAGES, **params)
    stamps: list[list[float]] = [[] for _ in range(batch)]
    for i in range(batch):
        llm.engine.add(prompt, gen, lambda ev, i=i: stamps[i].append(time.perf_counter()))
    llm.engine.run_until_idle()
    rates = [(len(s) - 2) / (s[-2] - s[0]) for s in stamps]  # the last stamp is the finish event
    return sum(rates) / len(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=Path("weights/bench"))
    p.add_argument("--sizes", nargs="+", default=["small", "0.5b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--walks", type=int, default=20)
    a = p.parse_args()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_name()}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    print(f"\n## mask fill per token, v3 vocabulary, {a.walks} random walks\n")
    mask_fill(a.walks)
    for size in a.sizes:
        folder = a.cache / f"{size}-float32-consolidated"
        if not folder.exists():
            make_random(folder, preset(size), "consolidated", "float32", seed=0)
        llm = Mistral.from_pretrained(folder, device="cpu", kernels="torch", max_batch=max(a.batches), max_seq_len=512,
                                      compile=True, quiet=True)
        print(f"\n## {size}, compile=True, greedy, {NEW_TOKENS} new tokens a row\n")
        print("| batch | free tok/s/row | json_schema tok/s/row | extra time per token |\n|---|---|---|---|")
        for batch in a.batches:
            for constrained in (False, True):  # warm-up: compile this batch class with and without the mask
                decode_rate(llm, batch, constrained)
            best = {False: 0.0, True: 0.0}
            for _ in range(a.runs):
                for constrained in (False, True):
                    best[constrained] = max(best[constrained], decode_rate(llm, batch, constrained))
            print(f"| {batch} | {best[False]:.1f} | {best[True]:.1f} | {best[False] / best[True] - 1:+.1%} |")
    print(f"\n# done, load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
