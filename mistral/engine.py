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

The rows' device state (last tokens, positions, sampling settings) is `Rows` (rows.py); one decode
step over it is `DecodeStep` (decode_step.py), run eagerly, replayed from CUDA graphs
(`cuda_graphs=True`, the default on CUDA with the Triton kernels) or, on the CPU with `compile=True`,
through torch.compile. Prompts are read eagerly, except, with `compile=True` and `prefill_chunk`,
their chunks of exactly `prefill_chunk` tokens: `PrefillStep` (prefill_step.py) compiles those once
for every position, so that a chunk between two decode steps costs its work rather than its dispatch.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .decode_step import DecodeStep
from .kv_cache import BLOCK_SIZE, BlockPool, bytes_per_block
from .model import Transformer
from .prefill_step import PrefillStep
from .rows import Rows
from .sampling import BatchFlags, sample, token_logprobs

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
    hashes: list[bytes] = field(default_factory=list)  # of its full blocks registered so far (BlockPool.register)
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
        prefill_chunk_decay: int | None = None,
        block_size: int = BLOCK_SIZE,
        mixed_prefill: bool | None = None,
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
        if prefill_chunk_decay is not None and (prefill_chunk is None or prefill_chunk_decay < 1):
            raise ValueError(f"prefill_chunk_decay needs prefill_chunk and a positive position, got {prefill_chunk_decay}")
        self.prefill_chunk_decay = prefill_chunk_decay
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

        self.rows = Rows(max_batch, self.vocab_size, self.device)
        self.decode_step = DecodeStep(model, self.cache, self.rows, eos_id, compile=compile, cuda_graphs=cuda_graphs)
        # Not for a model that announces each call to other processes (tensor parallelism's leader):
        # a compiled call cannot announce itself (DecodeStep._announced).
        self.prefill_step = PrefillStep(model, self.cache, prefill_chunk,
                                        compile=compile and getattr(model, "announced", None) is None)
        # Mixed steps need attention that takes a PackedView (ops.py's tables) and a model called
        # directly (not tensor parallelism's leader, which announces each call in its own format).
        # By default not with a fixed batch shape: a mixed step's matmuls have more rows than a decode
        # step's, and CPU BLAS (MKL in fp32, oneDNN in bf16) picks its kernel, hence a row's rounding,
        # by the row count, so a decode row would not keep its bits whatever the company.
        if mixed_prefill is None:
            mixed_prefill = not fixed_batch_shape
        self.mixed_prefill = bool(mixed_prefill and getattr(model.ops.attention, "per_sequence", False)
                                  and getattr(model, "capturable", True))

        self.running: dict[int, Sequence] = {}  # row -> sequence
        self.prefilling: collections.deque[Sequence] = collections.deque()  # holding a row, prompt not yet read
        self.free_rows = list(range(max_batch))
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._cancelled: set[int] = set()
        self.steps = 0  # decode steps run: the server's debug view measures cancellation in steps
        self._cv = threading.Condition()

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

    def serve_forever(self, stop: threading.Event, after_step: Callable[[], None] | None = None) -> None:
        """Run steps whenever there is work, until `stop` is set (the server's engine thread), calling
        `after_step()` after each (generate.py: wait until the step's tokens have left, handoff.py)."""
        while not stop.is_set():
            with self._cv:
                while not self.has_work() and not stop.is_set():
                    self._cv.wait(timeout=0.5)
            if not stop.is_set():
                self.step()
                if after_step is not None:
                    after_step()

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
        chunks = self._chunks()
        mixed = self.mixed_prefill and bool(self.running) and bool(chunks)
        if not mixed:
            self._prefill(chunks)
        if not self.running:
            return
        try:
            self._decode(chunks if mixed else [])
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

    def _chunks(self) -> list[tuple[Sequence, int]]:
        """What this step reads of the prompts of the sequences holding a row, oldest first, as
        (sequence, where its chunk stops): all of them, or with `prefill_chunk`, chunks of that many
        tokens (`chunk_at`) while they fit in the first one's size this step (always one), so that
        the running rows' next decode step waits for about one chunk. A prompt's chunks are cut by
        their positions alone, the same way whatever else runs."""
        budget, chunks = None, []
        for seq in self.prefilling:
            size = min(self.chunk_at(seq.length), len(seq.prompt) - seq.length)
            if budget is None:
                budget = self.chunk_at(seq.length)
            elif size > budget:
                break
            budget -= size
            chunks.append((seq, seq.length + size))
        return chunks

    def chunk_at(self, position: int) -> int:
        """The most prompt tokens a chunk starting at `position` reads: `prefill_chunk` (all, without),
        and with `prefill_chunk_decay` d, past position d, prefill_chunk x d / position (at least 2), so
        that a late chunk's attention over its whole prefix costs about what a chunk at d costs."""
        chunk = self.prefill_chunk or self.max_seq_len
        d = self.prefill_chunk_decay
        if d is not None and position > d:
            chunk = min(chunk, max(2, chunk * d // position))
        return chunk

    def _prefill(self, chunks: list[tuple[Sequence, int]]) -> None:
        """Each chunk in a forward of its own: a chunk that fails finishes that sequence alone."""
        for seq, stop in chunks:
            try:
                self._prefill_chunk(seq, stop)
            except Exception as e:  # one prompt's failure is that sequence's alone
                log.exception("prefill failed")
                self._finish(seq, FinishEvent("error", f"{type(e).__name__}: {e}"))

    def _prefill_chunk(self, seq: Sequence, stop: int) -> None:
        """The prompt tokens of `seq` from where it stands to `stop` into its blocks; after the last,
        its first token."""
        tokens = torch.tensor([seq.prompt[seq.length : stop]], dtype=torch.long, device=self.device)
        self._chunk_read(seq, stop, self.prefill_step(tokens, seq.length, self._table(seq), stop, seq.id))

    def _table(self, seq: Sequence) -> torch.Tensor:
        """A prefilling sequence's own block table [1, n]: its row of the engine's table stays on the
        scratch block until it decodes, since decode steps write their idle rows there."""
        return torch.tensor([seq.blocks], dtype=torch.long, device=self.device)

    def _chunk_read(self, seq: Sequence, stop: int, logits: torch.Tensor | None) -> None:
        """The prompt of `seq` is in the cache up to `stop`; at its end, its first token from `logits` [1, V]."""
        seq.length = stop
        with self._cv:
            self.pool.register(seq.blocks, seq.prompt[:stop], seq.hashes)
        if stop == len(seq.prompt):
            self._start_decoding(seq, logits)

    def _start_decoding(self, seq: Sequence, logits: torch.Tensor) -> None:
        """The prompt is read: the row joins the decode batch, with its first token sampled from `logits`."""
        self.prefilling.remove(seq)
        row = seq.row
        self.running[row] = seq
        self.cache.block_table[row, : len(seq.blocks)] = torch.tensor(seq.blocks, dtype=torch.long, device=self.device)
        self.rows.start(row, seq.params, seq.prompt)
        seq.matcher = seq.params.constraint.matcher() if seq.params.constraint is not None else None
        flags, first = self._flags([seq]), seq.params.first_token
        if flags.constrained and first is None:
            self._fill_token_masks([seq], row, row + 1)
        if first is not None:
            next_tokens = torch.tensor([first], device=self.device)
        else:
            next_tokens = sample(logits, self.rows.sampling(row, row + 1, flags), flags, self.eos_id)
        self.rows.record(row, row + 1, next_tokens, flags, fed=False)
        self._hand_out([seq], row, logits, next_tokens)

    def _decode(self, chunks: list[tuple[Sequence, int]]) -> None:
        """One decode step for every running row (rows 0..h-1, or all with a fixed batch shape), with
        `chunks` of prompts read in the same forward (a mixed step). A mixed forward that fails is
        run again apart, so that a failure is that of the prompt or of the rows that caused it."""
        self.steps += 1
        rows = sorted(self.running)
        hi = self.max_batch if self.fixed_batch_shape else rows[-1] + 1
        seqs = [self.running[r] for r in rows]
        flags = self._flags(seqs)
        if flags.constrained:
            self._fill_token_masks(seqs, 0, hi)
        length = self._attention_length(seqs)
        firsts = []
        if chunks:
            try:
                logits, next_tokens, firsts = self.decode_step.with_chunks(hi, flags, length, [
                    (seq.prompt[seq.length : stop], seq.length, self._table(seq), stop == len(seq.prompt))
                    for seq, stop in chunks])
            except Exception:
                log.exception("a mixed step failed; running its prompt chunks and its decode step apart")
                self.steps -= 1
                self._prefill(chunks)  # which may start rows decoding: the step is planned again
                if self.running:
                    self._decode([])
                return
        else:
            logits, next_tokens = self.decode_step(hi, flags, length)
        for seq in seqs:
            seq.length += 1
        self._hand_out(seqs, 0, logits, next_tokens)
        for (seq, stop), first in zip(chunks, firsts):
            self._chunk_read(seq, stop, first)

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
        return attention_length(n, limit, self.attention_step())

    def attention_step(self) -> int:
        """What `_attention_length` rounds up to: the block size on the CPU; on a GPU 256, or the whole
        cache with a fixed batch shape (one length)."""
        if self.device.type == "cpu":
            return self.cache.block_size
        return self.cache.max_seq_len if self.fixed_batch_shape else 256

    def warm_up_batches(self) -> list[int]:
        """Decode batch sizes that each need their own preparation (a compiled graph, a CUDA graph
        bucket: `DecodeStep.batch_sizes`); with a fixed batch shape, only the full batch."""
        return [self.max_batch] if self.fixed_batch_shape else self.decode_step.batch_sizes()

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
                self.rows.stop(row)
                self.cache.block_table[row] = 0  # the scratch block (see kv_cache.py)
            else:
                self.prefilling.remove(seq)
            self.free_rows.append(row)
            self.free_rows.sort()
            with self._cv:
                if event.reason != "error":  # after a failure, what was written is not trusted
                    self.pool.register(seq.blocks, (seq.prompt + seq.output)[: seq.length], seq.hashes)
                self.pool.release(seq.blocks)
            seq.blocks = []
        seq.emit(dataclasses.replace(event, cached_tokens=seq.cached))

    # --- what a batch uses -----------------------------------------------------------------------------

    def _fill_token_masks(self, seqs: list[Sequence], lo: int, hi: int) -> None:
        self.rows.fill_token_masks(lo, hi, [(s.row, s.matcher) for s in seqs if s.matcher is not None and s.matcher.active])

    @staticmethod
    def _flags(seqs: list[Sequence]) -> BatchFlags:
        return BatchFlags.of((s.params for s in seqs), constrained=any(s.matcher is not None and s.matcher.active for s in seqs))


def attention_length(n: int, limit: int, step: int = 256) -> int:
    """Round n up to a multiple of `step` (at most `limit`): fewer distinct attention lengths."""
    return min(limit, -(-n // step) * step)
