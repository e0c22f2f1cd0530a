"""The generation engine: many sequences decoded together over one paged KV cache.

Continuous batching: the engine has `max_batch` rows; a sequence owns one row from the step it is
admitted until it finishes, and the blocks of the KV-cache pool its positions need (kv_cache.py).
Each `step()`:

    1. drops cancelled sequences, waiting, prefilling or running, and frees their rows and blocks;
    2. admits waiting sequences, first come first served, while a row and the blocks for the whole
       sequence (prompt and max_tokens) are free; with prefix caching, the cached blocks of the
       prompt's longest known prefix are shared instead of computed again;
    3. reads prompts: each admitted prompt's uncached tokens, alone (so a prompt's numbers never
       depend on its neighbours), or with `prefill_chunk` about that many tokens a step, so that
       running rows keep decoding while a long prompt is read; after a prompt's last token, its
       first token is sampled; a prefill that fails finishes that sequence alone, with an error;
    4. runs one decode step for every running row at once: one token in, one token out per row
       (a failure here fails the rows of that batch, which share it).

A sequence that finishes offers its full blocks (prompt and answer) to the prefix cache, so the
next turn of a conversation reads them back.

Tokens go out through each sequence's `emit` callback as `TokenEvent`s, then one `FinishEvent`.
The engine knows token ids only: text, stop strings and chat formats live in the layers above
(`generate.py`), which may `cancel()` a sequence (a matched stop string, a client gone).

Decode batch shape. By default the decode batch covers rows 0..h-1, h being one past the highest
busy row (rows are handed out lowest first), so one sequence decodes at batch 1. With
`fixed_batch_shape=True` every decode step runs all `max_batch` rows (over the whole cache length
on GPUs; on the CPU over the longest row's positions, rounded up to whole blocks, since attention
there gives a row the same bits at any such length past its own): matrix kernels pick their reduction order by shape, and a fixed shape makes each
row's result bit-identical whatever the other rows hold, so greedy output never depends on the
company a request keeps. The server uses that.

All state the decode step reads lives on the device (`tokens`, `pos`, sampling settings); the host
reads back only the sampled tokens, to stream them. That is also what lets the decode step be
replayed from a CUDA graph (`cuda_graphs=True`, the default on CUDA with the Triton kernels; see
cuda_graphs.py); prefill stays eager, since prompt lengths vary. On the CPU, `compile=True` runs the
decode step through torch.compile instead (see `_compile_step`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .kv_cache import BLOCK_SIZE, BlockPool, bytes_per_block
from .model import Transformer
from .sampling import BatchFlags, SamplingTensors, mask_words, sample, token_logprobs

log = logging.getLogger("mistral")


@dataclass
class GenerationParams:
    """How one sequence is generated (validated by the layer above)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # don't stop at EOS
    min_tokens: int = 0  # EOS is banned until this many tokens are out
    logprobs: bool = False
    top_logprobs: int = 0
    first_token: int | None = None  # force the first generated token (e.g. [TOOL_CALLS])
    constraint: Any = None  # a grammar the answer must follow: structured.Constraint (its `matcher()`)

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def uses_filtering(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


@dataclass(frozen=True)
class TokenEvent:
    token: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" (EOS), "length" (max_tokens or context end), "cancelled", "error"
    message: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass(frozen=True)
class EngineStats:
    waiting: int                # sequences queued for a row
    running: int                # sequences holding a row
    kv_blocks_total: int
    kv_blocks_used: int         # held by sequences or kept as cached prefix blocks
    prefix_cache_queries: int   # prompt tokens looked up in the prefix cache, cumulative
    prefix_cache_hits: int      # of those, tokens served from the cache, cumulative


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    params: GenerationParams
    emit: Callable[[TokenEvent | FinishEvent], None]
    id: int = field(default_factory=itertools.count().__next__)
    row: int | None = None
    length: int = 0  # positions written to the cache
    blocks: list[int] = field(default_factory=list)  # the KV-cache blocks of its positions, in order
    cached: int = 0  # prompt tokens found in the prefix cache
    output: list[int] = field(default_factory=list)  # the tokens sampled so far
    generated: int = 0
    finished: bool = False
    matcher: Any = None  # structured.Matcher: where the sequence is in its grammar


class QueueFull(Exception):
    """The waiting queue is at its limit; try again later."""


class Engine:
    def __init__(
        self,
        model: Transformer,
        max_batch: int = 8,
        max_seq_len: int | None = None,
        eos_id: int = 2,
        fixed_batch_shape: bool = False,
        max_waiting: int = 256,
        cuda_graphs: bool | None = None,
        compile: bool = False,
        kv_cache_gb: float | None = None,
        prefix_caching: bool = True,
        prefill_chunk: int | None = None,
        block_size: int = BLOCK_SIZE,
    ):
        self.model = model
        self.max_batch = max_batch
        self.max_seq_len = min(max_seq_len or model.max_seq_len, model.max_seq_len)
        self.eos_id = eos_id
        self.fixed_batch_shape = fixed_batch_shape
        self.max_waiting = max_waiting
        self.device = model.output.weight.device
        self.vocab_size = model.args.vocab_size
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk
        if kv_cache_gb is None:  # every row its whole context, as a cache of one row per sequence would hold
            num_blocks = max_batch * -(-self.max_seq_len // block_size)
        else:
            num_blocks = int(kv_cache_gb * 2**30) // bytes_per_block(model.args, block_size, model.tok_embeddings.weight.dtype)
            if num_blocks < 1:
                raise ValueError(f"kv_cache_gb={kv_cache_gb} holds no block of {block_size} positions")
        # + block 0, the scratch block that idle rows write to (kv_cache.py)
        self.cache = model.new_paged_cache(num_blocks + 1, max_batch, self.max_seq_len, block_size)
        self.pool = BlockPool(num_blocks + 1, block_size, prefix_caching)
        self.prefix_queries = self.prefix_hits = 0

        R, dev = max_batch, self.device
        # per-row device state of the decode step
        self.tokens = torch.zeros(R, dtype=torch.long, device=dev)  # last token of each row
        self.pos = torch.zeros(R, dtype=torch.long, device=dev)  # where that token goes in the cache
        self.active = torch.zeros(R, dtype=torch.long, device=dev)  # 1 for busy rows
        self.n_generated = torch.zeros(R, dtype=torch.long, device=dev)
        self.min_tokens = torch.zeros(R, dtype=torch.long, device=dev)
        f32 = dict(dtype=torch.float32, device=dev)
        self.temperature, self.top_p, self.min_p = torch.zeros(R, **f32), torch.ones(R, **f32), torch.zeros(R, **f32)
        self.top_k = torch.zeros(R, dtype=torch.long, device=dev)
        self.presence, self.frequency, self.repetition = torch.zeros(R, **f32), torch.zeros(R, **f32), torch.ones(R, **f32)
        self.seed = torch.zeros(R, dtype=torch.long, device=dev)
        self.logit_bias: torch.Tensor | None = None  # [R, V], allocated when first needed
        self.counts: torch.Tensor | None = None  # [R, V]
        self.in_prompt: torch.Tensor | None = None  # [R, V]
        # The grammars' token masks ([R, V/32] int32 bits, 4 KB a row): filled on the host, copied
        # to the device for each step with a constrained row (rows without a grammar allow all).
        words = mask_words(self.vocab_size)
        self.token_mask = torch.full((R, words), -1, dtype=torch.int32, device=dev)
        self._host_mask = torch.full((R, words), -1, dtype=torch.int32, pin_memory=dev.type == "cuda")
        if compile and cuda_graphs:
            raise ValueError("choose one of compile=True and cuda_graphs=True: both replace the eager decode step")
        self.graphs = None if compile else self._captured_steps(cuda_graphs)  # None: no CUDA graphs
        self.compiled_step = self._compile_step() if compile else None  # None: eager (or fallen back to it)

        self.running: dict[int, Sequence] = {}  # row -> sequence
        self.prefilling: collections.deque[Sequence] = collections.deque()  # holding a row, prompt not yet read
        self.free_rows = list(range(R))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[int] = set()
        self.steps = 0  # decode steps run: the server's debug view measures cancellation in steps
        self._cv = threading.Condition()
        self._seed_source = torch.Generator().manual_seed(torch.initial_seed() & 0xFFFFFFFF)

    # --- the interface for the layers above (thread-safe) -----------------------------------------

    def add(self, prompt: list[int], params: GenerationParams, emit: Callable) -> Sequence:
        """Queue a sequence; its events arrive through `emit` (called on the engine's thread)."""
        seq = Sequence(list(prompt), params, emit)
        with self._cv:
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
            self._cv.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence at the next step boundary and free its row."""
        with self._cv:
            self._cancelled.add(seq.id)
            self._cv.notify()

    def has_work(self) -> bool:
        return bool(self.running or self.prefilling or self.waiting or self._cancelled)

    def stats(self) -> EngineStats:
        with self._cv:
            return EngineStats(
                waiting=len(self.waiting), running=len(self.running) + len(self.prefilling),
                kv_blocks_total=self.pool.capacity, kv_blocks_used=self.pool.used,
                prefix_cache_queries=self.prefix_queries, prefix_cache_hits=self.prefix_hits,
            )

    def debug_state(self) -> dict:
        """The rows and the step count, for the server's debug view."""
        with self._cv:
            return {
                "max_batch": self.max_batch,
                "running": len(self.running) + len(self.prefilling),
                "waiting": len(self.waiting),
                "free_rows": len(self.free_rows),
                "rows": sorted(self.running),
                "steps": self.steps,
                "kv_blocks_free": self.pool.available,
            }

    def serve_forever(self, stop: threading.Event) -> None:
        """Run steps whenever there is work, until `stop` is set (the server's engine thread)."""
        while not stop.is_set():
            with self._cv:
                while not self.has_work() and not stop.is_set():
                    self._cv.wait(timeout=0.5)
            if not stop.is_set():
                self.step()

    def run_until_idle(self) -> None:
        """Run steps on the calling thread until every queued and running sequence has finished
        (for callers without an engine thread: warm-up, benchmarks, tests)."""
        while self.has_work():
            self.step()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # --- one step ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        with self._cv:
            cancelled, self._cancelled = self._cancelled, set()
            dropped = [s for s in self.waiting if s.id in cancelled] if cancelled else []
            if dropped:  # a cancelled sequence never takes a row, wherever it waits in the queue
                self.waiting = collections.deque(s for s in self.waiting if s.id not in cancelled)
        holding = [*self.running.values(), *self.prefilling]
        for seq in dropped + [s for s in holding if s.id in cancelled]:
            self._finish(seq, FinishEvent("cancelled"))
        # Only now are the cancelled sequences' rows and blocks free.
        with self._cv:
            admitted = self._admit()
        for seq, error in admitted:
            if error is not None:
                self._finish(seq, FinishEvent("error", error))
        self._prefill_some()
        if not self.running:
            return
        try:
            self._decode()
        except Exception as e:  # the rows decode as one batch: no consumer may wait forever
            log.exception("decode step failed")
            for seq in list(self.running.values()):
                self._finish(seq, FinishEvent("error", f"{type(e).__name__}: {e}"))

    # --- admission and prefill ------------------------------------------------------------------------

    def _admit(self) -> list[tuple[Sequence, str | None]]:
        """Take waiting sequences, first come first served, while a row and the blocks for the whole
        sequence (prompt and max_tokens, within the context) are free; each with the error that
        refuses it, if any. The first that must wait for blocks holds back those behind it, so a
        long prompt is not starved by short ones. Called holding the lock."""
        admitted, bs = [], self.pool.block_size
        while self.waiting and self.free_rows:
            seq = self.waiting[0]
            n = len(seq.prompt)
            positions = min(n + seq.params.max_tokens, self.max_seq_len)
            error = None
            if n == 0 or n >= self.max_seq_len:
                error = f"the prompt has {n} tokens; the context holds {self.max_seq_len}"
            elif self.pool.blocks_for(positions) > self.pool.capacity:
                error = (f"the prompt has {n} tokens and its answer may take {positions - n} more: {positions} positions "
                         f"do not fit in the KV cache pool of {self.pool.capacity * bs} positions "
                         f"({self.pool.capacity} blocks of {bs}); raise --kv-cache-gb or lower max_tokens")
            if error is not None:
                admitted.append((self.waiting.popleft(), error))
                continue
            prefix = self.pool.match(seq.prompt[: n - 1])  # the last token is always computed: its logits are needed
            new = self.pool.blocks_for(positions) - len(prefix)
            if not self.pool.can_allocate(prefix, new):
                break
            self.waiting.popleft()
            seq.blocks = self.pool.acquire(prefix, new)
            seq.cached = seq.length = len(prefix) * bs
            if self.pool.prefix_caching:
                self.prefix_queries += n
                self.prefix_hits += seq.cached
            seq.row = self.free_rows.pop(0)
            self.prefilling.append(seq)
            admitted.append((seq, None))
        return admitted

    def _prefill_some(self) -> None:
        """Read the prompts of the sequences holding a row, oldest first: all of them, or with
        `prefill_chunk`, chunks of that many tokens while they fit in that many this step (always
        one), so that the running rows' next decode step waits for about one chunk. A prompt's chunks
        are cut the same way whatever else runs, and each runs alone, so its numbers never depend
        on its neighbours; a chunk that fails finishes that sequence alone."""
        chunk = self.prefill_chunk or self.max_seq_len
        budget = chunk
        while self.prefilling:
            seq = self.prefilling[0]
            size = min(chunk, len(seq.prompt) - seq.length)
            if size > budget and budget < chunk:
                return
            budget -= size
            try:
                self._prefill_chunk(seq, seq.length + size)
            except Exception as e:  # one prompt's failure is that sequence's alone
                log.exception("prefill failed")
                self._finish(seq, FinishEvent("error", f"{type(e).__name__}: {e}"))

    def _prefill_chunk(self, seq: Sequence, stop: int) -> None:
        """The prompt tokens of `seq` from where it stands to `stop` into its blocks; after the last,
        its first token."""
        start, n = seq.length, len(seq.prompt)
        dev = self.device
        tokens = torch.tensor([seq.prompt[start:stop]], dtype=torch.long, device=dev)
        # Through the sequence's own table: its row of the engine's table stays on the scratch block
        # until it decodes, since decode steps write their idle rows there.
        cache = self.cache.with_table(torch.tensor([seq.blocks], dtype=torch.long, device=dev), length=stop)
        logits = self.model(tokens, torch.tensor([start], dtype=torch.long, device=dev), cache, last_only=True)[:, -1]
        seq.length = stop
        with self._cv:
            self.pool.register(seq.blocks, seq.prompt[:stop])
        if stop == n:
            self._start_decoding(seq, logits)

    def _start_decoding(self, seq: Sequence, logits: torch.Tensor) -> None:
        """The prompt is read: the row joins the decode batch, with its first token sampled from `logits`."""
        self.prefilling.remove(seq)
        row = seq.row
        self.running[row] = seq
        self.cache.block_table[row, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.long, device=self.device)
        self._set_row(seq)
        flags, first = self._flags([seq]), seq.params.first_token
        if flags.constrained and first is None:
            self._fill_masks([seq], row, row + 1)
        if first is not None:
            next_tokens = torch.tensor([first], device=self.device)
        else:
            next_tokens = sample(logits, self._sampling(row, row + 1, flags), flags, self.eos_id)
        self._record(row, row + 1, next_tokens, flags, fed=False)
        self._hand_out([seq], row, logits, next_tokens)

    def _decode(self) -> None:
        self.steps += 1
        rows = sorted(self.running)
        hi = self.max_batch if self.fixed_batch_shape else rows[-1] + 1
        seqs = [self.running[r] for r in rows]
        flags = self._flags(seqs)
        if flags.constrained:
            self._fill_masks(seqs, 0, hi)
        graphed = self.graphs(hi, flags) if self.graphs is not None else None
        if graphed is not None:  # a replayed CUDA graph decoded rows 0..bucket-1 (see _graph_step)
            logits, next_tokens = graphed[0][:hi], graphed[1][:hi]
            self._record(0, hi, next_tokens, flags, fed=True)
        else:
            length = self._attention_length(seqs)
            logits, next_tokens = self.decode_step(hi, flags, length)
        for seq in seqs:
            seq.length += 1
        self._hand_out(seqs, 0, logits, next_tokens)

    def _attention_length(self, seqs: list[Sequence]) -> int:
        """How many cache positions the decode step reads: the longest row's (+ the new token), rounded up.

        On the CPU, to a multiple of the block size (16), even with a fixed batch shape. Every
        position read is paid for there (all rows over a server's 8,704 positions: 0.19 s a step for
        the small model), and PyTorch's CPU attention gives a row the same bits at every such length
        past its own (tests/test_model.py checks it; not at lengths between, where its vector loops
        have a tail), so with a fixed batch shape only the batch dimension must stay fixed. Elsewhere
        to a multiple of 256 (fewer distinct lengths), or, with a fixed batch shape, the whole cache,
        since the GPU decode kernel splits its work by the length it is given."""
        n, limit = max(s.length for s in seqs) + 1, self.cache.max_seq_len  # a multiple of the block size
        if self.device.type == "cpu":
            return attention_length(n, limit, self.cache.block_size)
        return limit if self.fixed_batch_shape else attention_length(n, limit, 256)

    def decode_step(self, batch: int, flags: BatchFlags, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..batch-1 one token further (`_step`, then `_record`): the logits [batch, V] and the
        tokens [batch] sampled. Through torch.compile with compile=True. A compiled step that fails
        (no C++ compiler, a compiler bug, but also an error the eager step would raise too, such as
        running out of memory) is dropped for the eager one for good, with a warning; the rows' state
        is put back first, since a step may fail after moving some of it on (the eager rerun writes
        the same cache positions again). Keeping that copy costs 3-4 small clones a step."""
        with self._announced(batch, length):
            if self.compiled_step is not None:
                moved = self._moved_by_step(batch, flags)
                saved = [t.clone() for t in moved]
                try:
                    return self.compiled_step(batch, flags, length)
                except Exception as e:
                    log.warning("the compiled decode step failed (%s: %s); decoding eagerly from now on",
                                type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                    self.compiled_step = None
                    for t, before in zip(moved, saved):
                        t.copy_(before)
            return self._step_and_record(batch, flags, length)

    def _announced(self, batch: int, length: int):
        """A model that tells other processes of each call from the host before making it (tensor
        parallelism's Leader, tp_replay.py) cannot do so from inside a compiled step: the step's
        model call is announced here, before the step runs. Nothing to do for a plain model."""
        announced = getattr(self.model, "announced", None)
        if announced is None:
            return contextlib.nullcontext()
        return announced(self.tokens[:batch, None], self.pos[:batch], self.cache.view(0, batch, length=length),
                         compiled=self.compiled_step is not None)

    def _step_and_record(self, batch: int, flags: BatchFlags, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits, next_tokens = self._step(batch, flags, length)
        self._record(0, batch, next_tokens, flags, fed=True)
        return logits, next_tokens

    def _filtering_step_and_record(self, batch: int, flags: BatchFlags, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same, as a function of its own, so that torch.compile caches it apart (see _compile_step)."""
        return self._step_and_record(batch, flags, length)

    def _moved_by_step(self, batch: int, flags: BatchFlags) -> list[torch.Tensor]:
        """The per-row state a decode step of rows 0..batch-1 changes (besides the cache)."""
        moved = [self.tokens[:batch], self.pos[:batch], self.n_generated[:batch]]
        return moved + [self.counts[:batch]] if flags.penalties else moved

    # --- torch.compile of the decode step ------------------------------------------------------------

    def _compile_step(self):
        """The decode step (`_step_and_record`: forward, sampling, the rows' state) through
        torch.compile; prefill stays eager, since each prompt length would be a new shape.

        On the CPU this is the fast path. Eager PyTorch runs a decode step as a few hundred separate
        ops, ~1 ms of dispatch on a small model, and its bf16 mat-vecs read 15-18 GB/s; inductor fuses
        the glue between matmuls, the sampler and the state update into a few C++ loops, and the
        mat-vecs into vectorised reductions that read at memory speed (see `linear` in model.py;
        BENCHMARKS.md has the figures), and the step costs one Python call. The price is compilation:
        ~10 s for the small preset, ~1 min at 0.5B, on 2 cores, for the first step of each batch class
        (1 row, 2-4, more) and each set of sampling features (`BatchFlags`; `Mistral.warm_up` does the
        common ones ahead). Shapes are dynamic, so the growing cache length does not recompile. Needs a
        C++ compiler on the CPU.

        Only the PyTorch ops are compiled: on CUDA the Triton kernels and CUDA graphs (the default
        there) do this job.
        """
        if self.model.ops.name != "torch":
            raise ValueError(f"compile=True (--compile) compiles the PyTorch ops; this model uses kernels="
                             f"{self.model.ops.name!r}: load it with kernels='torch' (--kernels torch), or leave "
                             "compile off on CUDA, where the Triton kernels run with CUDA graphs")
        # Each batch class (1 row, 2-4, more) x set of sampling features (greedy or not, penalties,
        # filtering, logit_bias, a token mask: 24) is a compilation of its own, 72 at most. Where torch.compile
        # takes a limit for one function (torch 2.13 does), allow them; elsewhere raise dynamo's
        # global limit (8), past which a fullgraph compile raises (and we would fall back).
        limit = {"recompile_limit": 128}
        if "recompile_limit" not in inspect.signature(torch.compile).parameters:
            limit = {}
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 128)
        # Only the ints `batch` and `length` vary: the cache and the per-row state keep their shapes,
        # and marking them static spares every call their shape guards (in Python, ~0.1 ms a step).
        rows = (self.tokens, self.pos, self.active, self.n_generated, self.min_tokens, self.temperature, self.top_k,
                self.top_p, self.min_p, self.presence, self.frequency, self.repetition, self.seed, self.token_mask)
        for t in (*self.cache.k, *self.cache.v, self.cache.block_table, *rows):
            torch._dynamo.mark_static(t)
        # realize_opcount_threshold=0: store each intermediate rather than recompute it inside its
        # consumers. Otherwise inductor inlines an RMSNorm (its rsqrt included) into the inner loop
        # of the next mat-vec, once per weight row; storing it made decode steps 5-25% faster here.
        # Not for batches that filter (top-k / top-p / min-p): with it, inductor (torch 2.13)
        # miscompiles the sort of a batch of 2 or more rows: the generated code raised
        # UnboundLocalError or, with in-place buffers off, sampled wrong tokens.
        plain = torch.compile(self._step_and_record, dynamic=True, fullgraph=True,
                              options={"realize_opcount_threshold": 0}, **limit)
        filtering = torch.compile(self._filtering_step_and_record, dynamic=True, fullgraph=True, **limit)
        return lambda batch, flags, length: (filtering if flags.filtering else plain)(batch, flags, length)

    def warm_up_batches(self) -> list[int]:
        """Decode batch sizes that each need their own preparation: one per compiled graph (batch 1,
        2-4 rows, more: see `linear` in model.py) or per CUDA graph bucket; with a fixed batch shape,
        only the full batch."""
        if self.fixed_batch_shape:
            return [self.max_batch]
        if self.graphs is not None:
            from .cuda_graphs import batch_buckets

            return list(batch_buckets(self.max_batch))
        return sorted({min(rows, self.max_batch) for rows in (1, 2, 5)})

    # --- CUDA graphs of the decode step (see cuda_graphs.py) -----------------------------------------

    def _captured_steps(self, cuda_graphs: bool | None):
        """None means: on for a CUDA model on the Triton kernels. Their decode attention reads each
        row's length on the device, so a graph over the whole cache costs no more than the rows'
        own lengths; PyTorch's attention would read the whole cache at every step. A model whose
        calls must run on the host each step (`capturable = False`: tensor parallelism's leader,
        which announces each call to the other ranks) decodes eagerly."""
        capturable = getattr(self.model, "capturable", True)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.model.ops.name == "triton" and capturable
        if not cuda_graphs:
            return None
        if not capturable:
            raise ValueError("cuda_graphs=True: this model cannot be captured in a CUDA graph (a tensor-parallel "
                             "model announces each call to its other ranks from the host)")
        if self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device; this one is on {self.device}")
        from .cuda_graphs import CapturedSteps

        return CapturedSteps(self._graph_step, self.max_batch)

    def _graph_step(self, batch: int, flags: BatchFlags) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode step as captured: rows 0..batch-1 over the whole cache, sampled with the
        features `flags` names, since those are host-side choices that the graph fixes. Reads only
        the engine's persistent tensors."""
        return self._step(batch, flags)

    def _step(self, batch: int, flags: BatchFlags, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows 0..batch-1 one token further through the model, attending over `length` cache
        positions (None: all of them), and their next tokens sampled: the logits [batch, V] and the
        tokens [batch]. Reads only the engine's persistent tensors and writes only the cache at the
        fed positions, as a captured graph must (its warm-up runs may not move any row on)."""
        logits = self.model(self.tokens[:batch, None], self.pos[:batch], self.cache.view(0, batch, length=length))[:, -1]
        return logits, sample(logits, self._sampling(0, batch, flags), flags, self.eos_id)

    def _record(self, lo: int, hi: int, next_tokens: torch.Tensor, flags: BatchFlags, fed: bool) -> None:
        """The device state of busy rows lo..hi-1 after a token was sampled for each: it is their
        next input, one more generated, and counted for penalties. `fed`: a decode step put the
        previous tokens in the cache, so the new ones go in at the next position (after a prefill,
        `pos` already points past the prompt)."""
        active = self.active[lo:hi]
        if fed:
            self.pos[lo:hi] += active
        self.tokens[lo:hi] = torch.where(active.bool(), next_tokens, self.tokens[lo:hi])
        self.n_generated[lo:hi] += active
        if flags.penalties:  # the only rows that read their counts; each is in every batch of its life
            self.counts[lo:hi].scatter_add_(1, next_tokens[:, None], active[:, None].int())

    def _hand_out(self, seqs: list[Sequence], lo: int, logits: torch.Tensor, next_tokens: torch.Tensor) -> None:
        """Send each sequence its token (rows from `lo` on) and finish those that are done."""
        top = max((s.params.top_logprobs for s in seqs if s.params.logprobs), default=-1)
        lp = token_logprobs(logits, next_tokens, top) if top >= 0 else None
        ids = next_tokens.tolist()  # the one host sync of a step
        lp = [t.tolist() if t is not None else None for t in lp] if lp is not None else None
        for seq in seqs:
            i = seq.row - lo
            token = ids[i]
            if lp is not None and seq.params.logprobs:
                k = seq.params.top_logprobs
                tops = tuple(zip(lp[2][i][:k], lp[1][i][:k])) if k else ()
                event = TokenEvent(token, lp[0][i], tops)
            else:
                event = TokenEvent(token)
            seq.generated += 1
            seq.output.append(token)
            if seq.matcher is not None:
                seq.matcher.advance(token)
            seq.emit(event)
            if seq.matcher is not None and seq.matcher.failed:  # a mask let through what the grammar refuses
                self._finish(seq, FinishEvent("error", f"constrained decoding failed: {seq.matcher.failed}"))
            elif token == self.eos_id and not seq.params.ignore_eos:
                self._finish(seq, FinishEvent("stop"))
            elif seq.generated >= seq.params.max_tokens or seq.length >= self.max_seq_len:
                self._finish(seq, FinishEvent("length"))  # out of tokens, or no cache position left

    def _finish(self, seq: Sequence, event: FinishEvent) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq.row is not None:
            row = seq.row
            if self.running.get(row) is seq:
                del self.running[row]
                self.active[row] = 0
                self.pos[row] = 0
                self.cache.block_table[row] = 0  # the scratch block (see kv_cache.py)
            else:
                self.prefilling.remove(seq)
            self.free_rows.append(row)
            self.free_rows.sort()
            with self._cv:
                if event.reason != "error":  # after a failure, what was written is not trusted
                    self.pool.register(seq.blocks, (seq.prompt + seq.output)[: seq.length])
                self.pool.release(seq.blocks)
            seq.blocks = []
        seq.emit(dataclasses.replace(event, cached_tokens=seq.cached))

    # --- per-row settings ---------------------------------------------------------------------------

    def _set_row(self, seq: Sequence) -> None:
        p, row = seq.params, seq.row
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**31 - 1, (), generator=self._seed_source))
        self.temperature[row], self.top_k[row], self.top_p[row], self.min_p[row] = p.temperature, p.top_k, p.top_p, p.min_p
        self.presence[row], self.frequency[row], self.repetition[row] = p.presence_penalty, p.frequency_penalty, p.repetition_penalty
        self.seed[row] = seed & 0x7FFFFFFF
        self.n_generated[row] = 0
        self.min_tokens[row] = p.min_tokens
        self.pos[row] = len(seq.prompt)
        self.active[row] = 1
        seq.matcher = p.constraint.matcher() if p.constraint is not None else None
        dev = self.device
        if p.logit_bias and self.logit_bias is None:
            self.logit_bias = self._table(torch.float32)
        if self.logit_bias is not None:
            self.logit_bias[row] = 0
            if p.logit_bias:
                ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=dev)
                self.logit_bias[row, ids] = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=dev)
        if p.uses_penalties and self.counts is None:
            self.counts, self.in_prompt = self._table(torch.int32), self._table(torch.bool)
        if self.counts is not None:
            self.counts[row] = 0
            self.in_prompt[row] = False
            self.in_prompt[row, torch.tensor(seq.prompt, dtype=torch.long, device=dev)] = True

    def _table(self, dtype: torch.dtype) -> torch.Tensor:
        """A [max_batch, V] table of per-row, per-token values, allocated when a request first needs it."""
        table = torch.zeros(self.max_batch, self.vocab_size, dtype=dtype, device=self.device)
        if self.compiled_step is not None:
            torch._dynamo.mark_static(table)  # as the other persistent tensors (see _compile_step)
        return table

    def _sampling(self, lo: int, hi: int, flags: BatchFlags) -> SamplingTensors:
        """The settings of rows lo..hi-1; the per-token tables only for a batch that uses them (what a
        compiled step does not read, it does not guard on either)."""
        return SamplingTensors(
            temperature=self.temperature[lo:hi], top_k=self.top_k[lo:hi], top_p=self.top_p[lo:hi],
            min_p=self.min_p[lo:hi], presence_penalty=self.presence[lo:hi], frequency_penalty=self.frequency[lo:hi],
            repetition_penalty=self.repetition[lo:hi], seed=self.seed[lo:hi], step=self.n_generated[lo:hi],
            ban_eos=self.n_generated[lo:hi] < self.min_tokens[lo:hi],
            logit_bias=self.logit_bias[lo:hi] if flags.logit_bias else None,
            counts=self.counts[lo:hi] if flags.penalties else None,
            in_prompt=self.in_prompt[lo:hi] if flags.penalties else None,
            token_mask=self.token_mask[lo:hi] if flags.constrained else None,
        )

    def _fill_masks(self, seqs: list[Sequence], lo: int, hi: int) -> None:
        """Rows lo..hi-1 of the token mask: each constrained row's grammar fills its own (on the
        host, ~30-100 µs a row), every other row allows all; then one copy to the device."""
        host = self._host_mask[lo:hi]
        host.fill_(-1)
        for seq in seqs:
            if seq.matcher is not None and seq.matcher.active:
                seq.matcher.fill(self._host_mask[seq.row])
        self.token_mask[lo:hi].copy_(host, non_blocking=True)

    @staticmethod
    def _flags(seqs: list[Sequence]) -> BatchFlags:
        return BatchFlags(
            greedy_only=all(s.params.temperature == 0 for s in seqs),
            penalties=any(s.params.uses_penalties for s in seqs),
            filtering=any(s.params.uses_filtering and s.params.temperature > 0 for s in seqs),
            logit_bias=any(s.params.logit_bias for s in seqs),
            constrained=any(s.matcher is not None and s.matcher.active for s in seqs),
        )


def attention_length(n: int, limit: int, step: int = 256) -> int:
    """Round n up to a multiple of `step` (at most `limit`): fewer distinct attention lengths."""
    return min(limit, -(-n // step) * step)
