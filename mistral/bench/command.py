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

Under torchrun (`torchrun --nproc-per-node N -m mistral.cli bench ...`) the model is split over the
N processes (tp.py): every rank makes its own part of the random model, then rank 0 measures and
prints the table while the others follow its model calls (tp_replay.py), as `generate` and `serve`
run. The figures that need the whole model in one process (the correctness checks against an fp32
copy, transformers), or a model call the followers cannot replay (CUDA graphs), or kernels switched
on rank 0 alone, are rows that say why they were skipped. The floors are a rank's: its 1/N of the
bytes at the bandwidth measured on rank 0's device. A section of its own gives the collectives' time
per decode step, each collective timed alone on every rank before the model is built.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import json
import math
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from .. import tp
from ..args import ModelArgs, preset
from ..describe import GPU, decode_cost, prefill_cost
from ..devices import resolve_device
from ..engine import Engine, attention_length
from ..formats import dtype_name
from ..make_random import random_model
from ..merged import merge_projections, unmerged
from ..ops import get_ops
from .collectives import step_collectives
from .steps import CORRECT_PROMPT, CORRECT_STEPS, decode_rate, fast_logits, prefill
from .timing import best_time, copy_bandwidth, cpu_name, matmul_rate, stamp_tokens
from .transformers_peer import fp32_references, hf_compiled_rates, hf_eager_rate, transformers_model

NA_CUDA = "n/a (needs CUDA)"
CONTEXTS = (128, 4096)  # batch-1 decode starts after this many positions
PREFILL_TOKENS = 2048
BATCHES = (8, 64)  # batched decode, at context 128
TARGETS = "targets (H100, bf16, batch 1, context 128)"
TP_SKIPPED = "skipped under tensor parallelism: "


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
            path.parent.mkdir(parents=True, exist_ok=True)
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
        ranks = self.meta.get("tensor_parallel", 1)
        split = f", tensor parallel over {ranks} ranks (torchrun)" if ranks > 1 else ""
        lines = [f"# mistral bench: {self.meta.get('model')} on {self.meta.get('device_name')}{split}, {self.meta.get('date')}",
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
    if v.is_integer() or abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


# ---------------------------------------------------------------------------------------------
# The run, one method per section of the table
# ---------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


class Bench:
    """One model, built once, measured section by section into `self.report`."""

    def __init__(self, a):
        self.device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cuda = self.device.type == "cuda"
        self.preset = a.preset or ("7b-v0.3" if self.cuda else "small")
        self.args: ModelArgs = preset(self.preset)
        self.dtype = torch.bfloat16
        self.quick = a.quick
        if self.cuda:
            self.steps, self.warmup, self.runs = a.steps or (16 if a.quick else 128), 2 if a.quick else 8, 1 if a.quick else 2
        else:  # a CPU runs the small preset to check the table, not to time it
            self.steps, self.warmup, self.runs = a.steps or 4, 2, 1
        self.no_compile, self.compile_budget = a.no_compile, a.compile_budget
        # the fast path: Triton kernels (+ CUDA graphs) on a GPU; the PyTorch ops on a CPU
        self.fast = "triton" if self.cuda else "torch"
        self.max_len = max(CONTEXTS) + self.steps + self.warmup + 64  # the longest KV cache a row needs
        self.report = Report(a.json)
        self.gen = torch.Generator().manual_seed(0)
        self.model = self.hf = None
        self.measured: GPU | None = None
        self.world, self.shard, self.collectives = tp.world_size(), None, None
        if self.world > 1:
            tp.Shard(0, self.world).check(self.args)  # before joining the group: every rank refuses alike
            self.shard, self.device = tp.init(self.device)

    def randint(self, *shape: int) -> torch.Tensor:
        """Random token ids (not zeros: a fair input), made on the CPU for the same ids on every device."""
        return torch.randint(0, self.args.vocab_size, shape, generator=self.gen).to(self.device)

    def use_kernels(self, kernels: str) -> None:
        self.model.use_ops(get_ops(kernels, self.device))

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self) -> Report:
        R = self.report
        if self.shard is not None:
            self.join()  # the other ranks do not return from it
        R.meta = _environment(self.device, self.preset, self.args, self.dtype, self.steps, self.world)
        R.save()
        split = f"; tensor parallel over {self.world} ranks" if self.shard is not None else ""
        R.log(f"{self.preset} on {R.meta['device_name']}; {self.steps} decode steps per figure{split}")
        self.machine()
        if self.shard is None:
            R.log("building the model with random weights")
            self.model = random_model(self.args, self.device, self.dtype, self.max_len)
            merge_projections(self.model)  # the separate matmuls stay available over the same storage: see unmerged()
            with R.guard("hf.build", "correctness", "transformers model"):
                self.hf = transformers_model(self.model)  # after merging, so that it shares the merged storage
        self.correctness()
        peak_correctness = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.decode_batch_1()
        self.tensor_parallel()
        self.targets()
        self.prefill()
        self.engine()
        self.batched()
        self.memory(peak_correctness)
        self.transformers_compiled()  # last: its compile time is the least predictable step
        if self.shard is not None:
            self.model.close()  # the followers exit
        R.log("done")
        return R

    def join(self) -> None:
        """Under torchrun, on every rank: time the collectives of a decode step, make this rank's part
        of the model (on the fast path's kernels, which no rank switches later), then put it to work:
        rank 0 goes on with the model behind a `Leader`; the other ranks follow its calls until it
        is done, and exit there."""
        # Ranks given other flags would make other calls (or other shapes) and wait on each other: refuse.
        mine = {"preset": self.preset, "steps": self.steps, "quick": self.quick, "device": self.device.type}
        everyone: list = [None] * self.world
        tp.collective(dist.all_gather_object, everyone, mine, group=self.shard.control)
        for rank, theirs in enumerate(everyone):
            if theirs != everyone[0]:
                differ = ", ".join(f"{k} {theirs[k]} against {everyone[0][k]}" for k in mine if theirs[k] != everyone[0][k])
                raise tp.TensorParallelError(f"rank {rank} was given other flags than rank 0 ({differ}): every rank "
                                             "must run the same benchmark")
        self.collectives = step_collectives(self.args, self.shard, self.device, self.dtype, 50 if self.quick else 200)
        part = random_model(self.args, self.device, self.dtype, self.max_len, kernels=self.fast, shard=self.shard)
        self.model = tp.lead_or_follow(part, self.shard)

    def skipped(self, kernels: str, graph: bool) -> str | None:
        """Why a way of running the model is not measured under tensor parallelism (None: it is)."""
        if self.shard is None:
            return None
        if graph:
            return TP_SKIPPED + "no CUDA graphs (the followers replay each announced call; docs/tensor-parallel.md)"
        if kernels != self.fast:
            return TP_SKIPPED + f"every rank keeps the kernels its part was built with ({self.fast})"
        return None

    # --- the machine: the two ceilings and the floor they imply ----------------------------------------

    def machine(self) -> None:
        R, S, cuda = self.report, "the machine", self.cuda
        with R.guard("copy_bandwidth", S, "copy bandwidth"):
            R.add("copy_bandwidth", S, "copy bandwidth", copy_bandwidth(self.device, self.quick) / 1e9, "GB/s",
                  f"{'1 GiB' if cuda else '128 MiB'} device-to-device copy, bytes read + written")
        with R.guard("matmul_rate", S, "bf16 matmul rate"):
            R.add("matmul_rate", S, "bf16 matmul rate", matmul_rate(self.device, self.dtype, self.quick) / 1e12, "TFLOP/s",
                  f"{8192 if cuda else 1024}³ matrix product")
        # A missing bandwidth makes every floor NaN ("nan" in the table); a missing matmul rate drops FLOPs from it.
        bw, flops = (R.value("copy_bandwidth") or math.nan) * 1e9, (R.value("matmul_rate") or math.inf) * 1e12
        self.measured = GPU("measured", bw, flops, "this run")
        weights = decode_cost(self.args, 1).bytes
        # Under TP each rank reads (and computes) its 1/N of a step, at its own device's rate.
        per_rank = f", 1/{self.world} of it by each rank," if self.shard is not None else ""
        for ctx in CONTEXTS:
            cost = decode_cost(self.args, ctx + 1)
            R.add(f"floor.b1.ctx{ctx}", S, f"floor, batch 1, context {ctx}", self.world / cost.floor_s(self.measured),
                  "tok/s", f"{cost.bytes / 1e9:.3g} GB read per step ({weights / 1e9:.3g} GB of weights + KV){per_rank} "
                  "/ copy bandwidth")

    # --- correctness ---------------------------------------------------------------------------------

    def correctness(self) -> None:
        R, S, model, hf = self.report, "correctness", self.model, self.hf
        label = "Triton + CUDA graph" if self.cuda else "PyTorch eager"
        if self.shard is not None:
            why = (TP_SKIPPED + "the fp32 reference and transformers hold the whole model in one process (the "
                   "tensor-parallel logits equal one process's within 1e-5 in fp32: tests/test_tp.py)")
            R.add("correct.fp32_vs_transformers", S, "ours fp32 vs transformers fp32", None, "", why)
            R.add("correct.ours_vs_fp32", S, f"ours bf16 ({label}) vs our fp32", None, "", why)
            return
        tokens = self.randint(1, CORRECT_PROMPT + CORRECT_STEPS)
        want = None  # our fp32 logits: the reference
        with R.guard("correct.fp32_vs_transformers", S, "ours fp32 vs transformers fp32"):
            want, hf_want = fp32_references(model, tokens)
            err = rel_err(want, hf_want)
            R.add("correct.fp32_vs_transformers", S, "ours fp32 vs transformers fp32", err, "",
                  "max rel. error, the same weights in fp32 (no tf32); tolerance 1e-4" + _verdict(err <= 1e-4))
        self.free()  # the fp32 copy (29 GB at 7B)
        with R.guard("correct.ours_vs_fp32", S, f"ours bf16 ({label}) vs our fp32"):
            if want is None:
                raise RuntimeError("no fp32 reference (see the row above)")
            self.use_kernels(self.fast)
            got = fast_logits(model, tokens, graph=self.cuda)
            hf_err = None
            if hf is not None:
                with torch.inference_mode():
                    hf_got = hf(tokens).logits[0, CORRECT_PROMPT - 1 :].float()
                hf_err = rel_err(hf_got, want)
                R.add("correct.transformers_vs_fp32", S, "transformers bf16 vs our fp32", hf_err, "",
                      "max rel. error: what bf16 rounding costs a correct implementation")
            err = rel_err(got, want)
            tol = max(2 * hf_err, 1e-2) if hf_err is not None else 5e-2
            R.add("correct.ours_vs_fp32", S, f"ours bf16 ({label}) vs our fp32", err, "",
                  f"max rel. error, last prompt position + {CORRECT_STEPS} decode steps; tolerance {tol:.3g} "
                  f"(2x transformers' bf16 error, at least 0.01)" + _verdict(err <= tol))
            if hf is not None:
                R.add("correct.ours_vs_transformers", S, "ours bf16 vs transformers bf16", rel_err(got, hf_got), "",
                      "max rel. error; no tolerance of its own: both round to bf16, differently")

    # --- decode at batch 1 -----------------------------------------------------------------------------

    VARIANTS = [  # key, label, kernels, CUDA graph, merged projections
        ("torch", "ours, torch eager", "torch", False, False),
        ("triton", "ours, Triton", "triton", False, False),
        ("triton_graph", "ours, Triton + CUDA graph", "triton", True, False),
        ("triton_graph_merged", "ours, Triton + CUDA graph + merged projections", "triton", True, True),
    ]

    def decode_batch_1(self) -> None:
        R, S, model = self.report, "decode, batch 1", self.model
        cache = model.new_cache(1, self.max_len)
        for ctx in CONTEXTS:
            R.log(f"prefill of {ctx} tokens for the decode runs")
            prompt = self.randint(1, ctx)
            with torch.inference_mode():
                self.use_kernels(self.fast)
                prefill(model, cache, prompt)
            floor = R.value(f"floor.b1.ctx{ctx}")
            for name, label, kernels, graph, merged in self.VARIANTS:
                key, label = f"decode.b1.ctx{ctx}.{name}", f"{label}, context {ctx}"
                if kernels == "triton" and not self.cuda:
                    R.add(key, S, label, None, "", NA_CUDA)
                    continue
                if why := self.skipped(kernels, graph):
                    R.add(key, S, label, None, "", why)
                    continue
                with R.guard(key, S, label), torch.inference_mode():
                    self.use_kernels(kernels)
                    with contextlib.nullcontext() if merged else unmerged(model):
                        rate = decode_rate(model, cache, 1, ctx, self.steps, self.warmup, self.runs, graph)
                    R.add(key, S, label, rate, "tok/s", _of_floor(rate, floor))
            key, label = f"decode.b1.ctx{ctx}.transformers", f"transformers eager, context {ctx}"
            if self.shard is not None:
                R.add(key, S, label, None, "", TP_SKIPPED + "transformers holds the whole model in one process")
            else:
                with R.guard(key, S, label), torch.inference_mode():
                    if self.hf is None:
                        raise RuntimeError("no transformers model (see the correctness section)")
                    rate = hf_eager_rate(self.hf, prompt, self.steps, self.warmup, 1)
                    R.add(key, S, label, rate, "tok/s", f"MistralForCausalLM, sdpa, DynamicCache; {_of_floor(rate, floor)}")
            self.free()
        self.use_kernels(self.fast)

    def ours_b1(self) -> float | None:
        """Our fastest batch-1 decode at context 128 (tok/s) of those this run makes."""
        fastest = "triton" if self.shard is not None else "triton_graph_merged"  # TP: no CUDA graphs
        return self.report.value(f"decode.b1.ctx128.{fastest}" if self.cuda else "decode.b1.ctx128.torch")

    def tensor_parallel(self) -> None:
        """The collectives' share of a decode step (timed in `join`, before the model was built)."""
        if self.shard is None:
            return
        R, S, t, n = self.report, "tensor parallelism", self.collectives, 2 * self.args.n_layers
        R.add("tp.ranks", S, "ranks", self.world, "", f"torchrun processes; {self.world} {self.device.type} devices "
              f"({'NCCL' if self.cuda else 'gloo'}), each holding 1/{self.world} of the weights and the KV cache")
        R.add("tp.all_reduce", S, "all-reduce [1, 1, dim]", t["all_reduce"] * 1e6, "us",
              f"one call, median of {50 if self.quick else 200}; {n} per decode step (after wo and w2 of each layer)")
        ours = self.ours_b1()
        share = f"; {100 * t['per_step'] * ours:.0f}% of a batch-1 step at context 128" if ours else ""
        R.add("tp.collectives_per_step", S, "collectives per decode step", t["per_step"] * 1e3, "ms",
              f"{n} all-reduces {n * t['all_reduce'] * 1e3:.3g} ms + the logits' all-gather "
              f"{t['all_gather'] * 1e3:.3g} ms + rank 0's 2 announcements {(t['header'] + t['payload']) * 1e3:.3g} ms, "
              f"each timed alone{share}")

    def targets(self) -> None:
        R, judge = self.report, self.cuda and self.shard is None  # the targets are one H100's
        ours = self.ours_b1()
        floor, hf = R.value("floor.b1.ctx128"), R.value("decode.b1.ctx128.transformers")
        if ours is None:
            for key, label in (("target.floor", "ours / floor"), ("target.vs_transformers", "ours / transformers eager")):
                R.add(key, TARGETS, label, None, "", "no figure for ours (see above)")
            return
        R.add("target.floor", TARGETS, "ours / floor", 100 * ours / floor if floor else None, "%",
              f"{ours:.1f} tok/s" + _target(judge, bool(floor) and ours >= 190 and ours >= 0.9 * floor, ">= 190 tok/s and >= 90%"))
        R.add("target.vs_transformers", TARGETS, "ours / transformers eager", ours / hf if hf else None, "x",
              ("same weights, same run" if self.shard is None else TP_SKIPPED + "no transformers run")
              + _target(judge, bool(hf) and ours >= 4 * hf, ">= 4x"))

    # --- prefill and time to first token -----------------------------------------------------------------

    def prefill(self) -> None:
        R, S, model, device = self.report, f"prefill, {PREFILL_TOKENS} tokens", self.model, self.device
        prompt = self.randint(1, PREFILL_TOKENS)
        cost = prefill_cost(self.args, PREFILL_TOKENS)
        cache = model.new_cache(1, PREFILL_TOKENS)
        flops = self.measured.flops * self.world  # under TP: N devices' matmul rates
        for kernels in ("triton", "torch") if self.cuda and self.shard is None else (self.fast,):
            key, label = f"prefill.{kernels}", f"ours, {'Triton' if kernels == 'triton' else 'torch eager'}"
            with R.guard(key, S, label), torch.inference_mode():
                self.use_kernels(kernels)
                zero = torch.zeros(1, dtype=torch.long, device=device)
                read_prompt = functools.partial(model, prompt, zero, cache, last_only=True)  # holds no name `del` unbinds
                read_prompt()  # warm-up
                seconds = best_time(read_prompt, device, self.runs + 1)
                R.add(key, S, f"{label}: tokens/s", PREFILL_TOKENS / seconds, "tok/s", f"{seconds * 1e3:.1f} ms for the prompt")
                judge = self.cuda and self.shard is None and kernels == self.fast
                target = _target(judge, cost.flops / seconds >= 0.6 * flops, "target >= 60%")
                R.add(key + ".tflops", S, f"{label}: TFLOP/s", cost.flops / seconds / 1e12, "TFLOP/s",
                      f"{cost.flops / 1e12:.3g} TFLOP (matmuls + causal attention); "
                      f"{100 * cost.flops / seconds / flops:.0f}% of the measured matmul rate"
                      f"{f' x {self.world} ranks' if self.shard is not None else ''}{target}")
        self.use_kernels(self.fast)
        del cache
        with R.guard("ttft", S, "time to first token"), torch.inference_mode():
            engine = Engine(model, max_batch=1, max_seq_len=PREFILL_TOKENS + 16)
            ids, seconds = prompt[0].tolist(), []
            for _ in range(self.runs + 1):  # the first is a warm-up
                start = time.perf_counter()
                (first, _), = stamp_tokens(engine, ids, 1)
                seconds.append(first - start)
            R.add("ttft", S, "time to first token", min(seconds[1:]) * 1e3, "ms",
                  f"{PREFILL_TOKENS}-token prompt through Engine ({'Triton' if self.cuda else 'PyTorch'} prefill): "
                  "prompt ids in, first sampled id on the host")

    # --- the engine, streaming ------------------------------------------------------------------------------

    def engine(self) -> None:
        R, S = self.report, "engine"
        with R.guard("engine.b1", S, "Engine, batch 1, streaming"), torch.inference_mode():
            engine = Engine(self.model, max_batch=1, max_seq_len=256 + self.steps + self.warmup)
            ids = self.randint(128).tolist()
            stamp_tokens(engine, ids, self.warmup + 1)  # a warm-up (it captures the graph)
            stamps = stamp_tokens(engine, ids, self.steps + 1)
            rate = self.steps / (stamps[-1][0] - stamps[0][0])  # from the first token (prefill's) to the last
            how = "CUDA graphs" if engine.decode_step.graphs is not None and engine.decode_step.graphs.replays else "eager"
            R.add("engine.b1", S, "Engine, batch 1, context 128, streaming", rate, "tok/s",
                  f"{how}; one host sync per token to stream it; {_of_floor(rate, R.value('floor.b1.ctx128'))}")

    # --- batched decode --------------------------------------------------------------------------------------

    def batched(self) -> None:
        R, S, model, ctx = self.report, "decode, batched (context 128)", self.model, 128
        kinds = [("triton_graph_merged", "ours, Triton + CUDA graph + merged", True), ("triton", "ours, Triton", False)] \
            if self.cuda else [("torch", "ours, torch eager", False)]
        for batch in BATCHES:
            floor = self.world * batch / decode_cost(self.args, ctx + 1, batch).floor_s(self.measured)
            cache = None
            for name, label, graph in kinds:
                key, label = f"decode.b{batch}.{name}", f"{label}, batch {batch}"
                if why := self.skipped(self.fast, graph):
                    R.add(key, S, label, None, "", why)
                    continue
                with R.guard(key, S, label), torch.inference_mode():
                    if cache is None:
                        cache = model.new_cache(batch, attention_length(ctx + self.steps + self.warmup + 1, self.max_len))
                        prefill(model, cache, self.randint(batch, ctx))
                    with contextlib.nullcontext() if graph else unmerged(model):
                        rate = decode_rate(model, cache, batch, ctx, self.steps, self.warmup, self.runs, graph)
                    R.add(key, S, label, rate, "tok/s", f"summed over rows; {_of_floor(rate, floor)}")
            del cache
            self.free()

    # --- memory -----------------------------------------------------------------------------------------------

    def memory(self, peak_correctness: float | None) -> None:
        R, S = self.report, "memory"
        if self.shard is not None:
            S += f", rank 0 of {self.world}"
        if self.cuda and self.shard is not None:
            R.add("memory.peak_speed", S, "peak GPU memory, speed runs", torch.cuda.max_memory_allocated(self.device) / 2**30,
                  "GiB", "rank 0's part of the bf16 weights and of the KV caches (batch 64 the largest)")
        elif self.cuda:
            R.add("memory.peak_correctness", S, "peak GPU memory, correctness check", peak_correctness, "GiB",
                  "bf16 weights + an fp32 copy (the reference) + transformers' permuted wq/wk copies")
            R.add("memory.peak_speed", S, "peak GPU memory, speed runs", torch.cuda.max_memory_allocated(self.device) / 2**30,
                  "GiB", "bf16 weights + KV caches (batch 64 the largest) + transformers' wq/wk copies and caches")
        else:
            import resource

            R.add("memory.peak_speed", S, "peak RSS of the process",
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "GiB", "CPU run: the whole process")

    # --- transformers with a static cache and torch.compile --------------------------------------------------

    def transformers_compiled(self) -> None:
        R, S = self.report, "decode, batch 1"

        def label(ctx: int) -> str:
            return f"transformers static cache + compile, context {ctx}"

        if not self.cuda or self.no_compile or self.hf is None:
            why = (NA_CUDA + " (reduce-overhead is CUDA graphs)" if not self.cuda
                   else "skipped (--no-compile)" if self.no_compile
                   else TP_SKIPPED + "transformers holds the whole model in one process" if self.shard is not None
                   else "no transformers model")
            for ctx in CONTEXTS:
                R.add(f"decode.b1.ctx{ctx}.transformers_compiled", S, label(ctx), None, "", why)
            return
        R.log(f"compiling transformers' decode step (budget {self.compile_budget} s)")
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                prompts = {ctx: self.randint(1, ctx) for ctx in CONTEXTS}
                rates = hf_compiled_rates(self.hf, prompts, self.steps, self.warmup, self.runs, self.compile_budget)
            took = time.perf_counter() - started
            for ctx, rate in rates.items():
                R.add(f"decode.b1.ctx{ctx}.transformers_compiled", S, label(ctx), rate, "tok/s",
                      f"StaticCache + torch.compile(mode='reduce-overhead'); compiling and capturing took {took:.0f} s "
                      f"in all; {_of_floor(rate, R.value(f'floor.b1.ctx{ctx}'))}")
        except Exception as e:  # noqa: BLE001 - a compile failure or timeout is a figure we could not get
            traceback.print_exc(file=sys.stderr)
            for ctx in CONTEXTS:
                R.add(f"decode.b1.ctx{ctx}.transformers_compiled", S, label(ctx), None, "",
                      f"error: {type(e).__name__}: {str(e)[:200]}")
        ours, compiled = R.value("decode.b1.ctx128.triton_graph_merged"), R.value("decode.b1.ctx128.transformers_compiled")
        if ours and compiled:
            R.add("ratio.vs_transformers_compiled", TARGETS, "ours / transformers compiled", ours / compiled, "x",
                  "no target; for the record")
        R.add("memory.peak_compiled", "memory", "peak GPU memory, speed runs + transformers compiled",
              torch.cuda.max_memory_allocated(self.device) / 2**30, "GiB", "adds its StaticCache and CUDA graph pool")


def _verdict(ok: bool) -> str:
    return ": PASS" if ok else ": FAIL"


def _target(judge: bool, ok: bool, what: str) -> str:
    # The targets are one H100's: on a CPU, or split over several devices, the ratios are for the record.
    return f"; {what}: {'met' if ok else 'NOT met'}" if judge else ""


def _of_floor(rate: float, floor: float | None) -> str:
    return f"{100 * rate / floor:.0f}% of the floor" if floor and math.isfinite(floor) else ""


def _environment(device: torch.device, preset_name: str, args: ModelArgs, dtype: torch.dtype, steps: int,
                 ranks: int = 1) -> dict:
    def version(module: str) -> str:
        try:
            return __import__(module).__version__
        except Exception:  # noqa: BLE001
            return "not installed"

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} (CPU, {torch.get_num_threads()} threads{' per rank' if ranks > 1 else ''})"
    return {
        "model": f"{preset_name} ({args.n_layers} layers, dim {args.dim}), random weights",
        "preset": preset_name, "device": str(device), "device_name": name, "dtype": dtype_name(dtype),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__, "triton": version("triton"), "transformers": version("transformers"),
        "python": platform.python_version(), "decode_steps": steps, "tensor_parallel": ranks,
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
    resolve_device(a.device)  # one line for a device that is not here
    report = Bench(a).run()  # writes --json (and the table beside it, .md) as it goes
    print(report.table())
    return 0
