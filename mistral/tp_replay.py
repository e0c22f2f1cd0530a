"""Rank 0 drives, the other ranks follow: how the ranks of a tensor-parallel model make the same calls.

Only rank 0 has a tokenizer, a scheduler (the Engine) and, for `serve`, the HTTP server. Every call
it makes into the model must run on all ranks at once, since each layer ends in a collective. The
engine makes three kinds of call: allocate its paged KV cache (once), prefill (a chunk of) one
prompt through that sequence's block table, and decode rows 0..B-1 one token further. So rank 0's
model is a `Leader`, which announces each call before making it:

    header  [op, B, T, cache id, first row, last row + 1, cache length, last_only, compiled]
                                                                         9 int64, gloo
    payload the call's token ids [B, T] and positions [B]                int64, the model's group
            (and for a paged cache, in place of the rows, its block table [B, n])

and each other rank runs `follow`: it receives the header and the payload and makes the same call
on its own shard and its own KV cache (its share of the heads). Nothing else is sent: the logits
come out whole on every rank (the output head's slices are gathered), but only rank 0 uses them;
it samples, and the tokens it picks reach the followers as the input of the next call. So sampling
happens once, and the followers never see a request, a sampling setting or a seed.

With compile=True the engine's decode step (forward, sampling, the rows' state) is one compiled
function, which cannot announce anything from inside: the engine announces the step's model call
before it runs it (`Leader.announced`, with `compiled` set), and each follower replays such calls
through its own compiled forward (`CompiledForward`). The two graphs differ (sampling is rank 0's
alone) but make the same collectives in the same order. CUDA graphs are not made under TP yet: the
same announcement would precede each replay, but the followers would need graphs of their own,
captured over static copies of the payload (docs/tensor-parallel.md).

The headers travel on a gloo group without a deadline, since a follower waits for the next one as
long as the server stays idle; the payload and the model's collectives keep the short deadline of
the default group (tp.COLLECTIVE_TIMEOUT). A rank that dies closes its sockets: the others' next
collective fails, and they exit with an error naming what was lost (torchrun, seeing a worker fail,
also stops the rest).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import os
import sys
import threading
import weakref

import torch
import torch.distributed as dist

from .decode_step import FORWARD_OPTIONS
from .kv_cache import BLOCK_SIZE, PagedKVCache
from .model import KVCache, Transformer
from .tp import Shard, TensorParallelError, collective

log = logging.getLogger("mistral")

EXIT, NEW_CACHE, FREE_CACHE, FORWARD, NEW_PAGED_CACHE = range(5)
PAGED = -1  # "first row" of a call through a paged cache: its block table follows the positions
HEADER = 9  # int64s


class Leader:
    """Rank 0's model: the same interface as the `Transformer` it wraps (attributes are its), with
    every call announced to the followers first. Thread-safe: one call at a time."""

    capturable = False  # each call is announced from the host: the engine replays no CUDA graph of it

    def __init__(self, model: Transformer, shard: Shard):
        self.model, self.shard = model, shard
        self._lock = threading.RLock()  # re-entered by the call inside `announced`
        self._announced = False  # inside `announced`, its call not yet made eagerly
        self._caches: dict[int, tuple[weakref.ref, int, int]] = {}  # id -> (cache, storage address, row stride)
        self._ids = itertools.count()
        self._closed = False
        atexit.register(self.close)

    def __getattr__(self, name: str):  # args, ops, output, max_seq_len, ...: the shard's own
        return getattr(self.model, name)

    def new_cache(self, max_batch: int, max_seq_len: int | None = None) -> KVCache:
        max_seq_len = max_seq_len or self.model.max_seq_len
        return self._new(NEW_CACHE, self.model.new_cache, max_batch, max_seq_len)

    def new_paged_cache(self, num_blocks: int, max_batch: int, max_seq_len: int | None = None,
                        block_size: int = BLOCK_SIZE) -> PagedKVCache:
        max_seq_len = max_seq_len or self.model.max_seq_len
        return self._new(NEW_PAGED_CACHE, self.model.new_paged_cache, num_blocks, max_batch, max_seq_len, block_size)

    def _new(self, op: int, allocate, *args: int):
        with self._lock:
            for cache_id in [i for i, (ref, _, _) in self._caches.items() if ref() is None]:
                self._announce(FREE_CACHE, cache_id)  # the followers drop their copy too
                del self._caches[cache_id]
            cache = allocate(*args)
            cache_id = next(self._ids)
            self._announce(op, cache_id, *args)
            k = cache.k[0]
            self._caches[cache_id] = (weakref.ref(cache), k.untyped_storage().data_ptr(), k.stride(0))
        return cache

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T]
        input_pos: torch.Tensor | None = None,  # [B]
        cache: KVCache | None = None,  # a view of rows of a cache from new_cache
        last_only: bool = False,
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced into a compiled step: announced before it ran
            if not self._announced:
                raise RuntimeError("a tensor-parallel model's call inside a compiled function must be announced to "
                                   "the other ranks first: make it inside Leader.announced(...)")
            return self.model(tokens, input_pos, cache, last_only)
        if tokens.is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a tensor-parallel model is not captured in a CUDA graph: each call is announced "
                               "to the other ranks from the host")
        with self._lock:
            if self._closed:
                raise TensorParallelError("the tensor-parallel group has been closed: the other ranks have exited")
            if self._announced:  # the call `announced` sent: a compiled step's eager rerun
                self._announced = False
            else:
                self._send(tokens, input_pos, cache, last_only, compiled=False)
            try:
                return self.model(tokens, input_pos, cache, last_only)
            except TensorParallelError as e:
                _lost(self.shard, e)

    __call__ = forward

    @contextlib.contextmanager
    def announced(self, tokens: torch.Tensor, input_pos: torch.Tensor, cache: KVCache | PagedKVCache,
                  compiled: bool):
        """Announce the call `self(tokens, input_pos, cache)` now, for the block to make it where it
        could not announce it itself: inside a compiled function (`compiled`: the followers make
        theirs through torch.compile too). The block's first call is that one, compiled, or eager
        if the compiled function failed before it ran (a compilation that failed); it is not
        announced again."""
        with self._lock:
            if self._closed:
                raise TensorParallelError("the tensor-parallel group has been closed: the other ranks have exited")
            self._send(tokens, input_pos, cache, False, compiled)
            self._announced = True
            try:
                yield
            finally:
                self._announced = False

    def _send(self, tokens: torch.Tensor, input_pos: torch.Tensor | None, cache: KVCache | PagedKVCache | None,
              last_only: bool, compiled: bool) -> None:
        """The header and the payload of one forward call (see the module's docstring)."""
        B, T = tokens.shape
        if cache is None:
            header, payload = (B, T, -1, 0, 0, 0), tokens.reshape(-1)
        else:
            cache_id, first = self._locate(cache)
            pos = input_pos if input_pos is not None else torch.zeros(B, dtype=torch.long, device=tokens.device)
            parts = [tokens.reshape(-1), pos.reshape(-1)]
            if isinstance(cache, PagedKVCache):
                header = (B, T, cache_id, PAGED, cache.block_table.shape[1], cache.length)
                parts.append(cache.block_table.reshape(-1))
            else:
                header = (B, T, cache_id, first, first + cache.max_batch, cache.length)
            payload = torch.cat(parts)
        self._announce(FORWARD, *header, int(last_only), int(compiled))
        try:
            collective(dist.broadcast, payload.to(torch.long).contiguous(), src=0, group=self.shard.group)
        except TensorParallelError as e:
            _lost(self.shard, e)

    def close(self) -> None:
        """Tell the followers to exit (at the latest when this process exits)."""
        with self._lock:
            if not self._closed and dist.is_initialized():
                self._closed = True
                self._announce(EXIT)
                dist.destroy_process_group()

    def _locate(self, view: KVCache) -> tuple[int, int]:
        """Which cache `view` is a view of, and its first row there."""
        k = view.k[0]
        for cache_id, (ref, address, row_stride) in self._caches.items():
            if ref() is not None and k.untyped_storage().data_ptr() == address:
                return cache_id, k.storage_offset() // row_stride
        raise ValueError("a tensor-parallel model's cache must come from its own new_cache() or new_paged_cache()")

    def _announce(self, op: int, *args: int) -> None:
        header = torch.tensor([op, *args] + [0] * (HEADER - 1 - len(args)), dtype=torch.long)
        try:
            collective(dist.broadcast, header, src=0, group=self.shard.control)
        except TensorParallelError as e:
            _lost(self.shard, e)


def follow(model: Transformer, shard: Shard) -> None:
    """Make rank 0's model calls on this rank's shard, until rank 0 says it is done."""
    caches: dict[int, KVCache | PagedKVCache] = {}
    device = model.output.weight.device
    compiled = CompiledForward(model, shard.rank)
    header = torch.empty(HEADER, dtype=torch.long)
    with torch.inference_mode():
        while True:
            try:
                collective(dist.broadcast, header, src=0, group=shard.control)
            except TensorParallelError as e:
                _lost(shard, e)
            op, *args = header.tolist()
            if op == EXIT:
                return
            if op == NEW_CACHE:
                cache_id, max_batch, max_seq_len = args[:3]
                caches[cache_id] = model.new_cache(max_batch, max_seq_len)
            elif op == NEW_PAGED_CACHE:
                cache_id, num_blocks, max_batch, max_seq_len, block_size = args[:5]
                caches[cache_id] = model.new_paged_cache(num_blocks, max_batch, max_seq_len, block_size)
            elif op == FREE_CACHE:
                caches.pop(args[0], None)
            elif op == FORWARD:
                B, T, cache_id, first, stop, length, last_only, through_compile = args
                table = B * stop if first == PAGED else 0  # a paged call's block table: [B, stop]
                payload = torch.empty(B * T + (B if cache_id >= 0 else 0) + table, dtype=torch.long, device=device)
                forward = compiled if through_compile else model
                try:
                    collective(dist.broadcast, payload, src=0, group=shard.group)
                    tokens = payload[: B * T].view(B, T)
                    pos = payload[B * T : B * T + B]
                    if cache_id < 0:
                        forward(tokens, last_only=bool(last_only))
                    elif first == PAGED:
                        cache = caches[cache_id].with_table(payload[B * T + B :].view(B, stop), length)
                        forward(tokens, pos, cache, bool(last_only))
                    else:
                        forward(tokens, pos, caches[cache_id].view(first, stop, length), bool(last_only))
                except TensorParallelError as e:
                    _lost(shard, e)
            else:
                raise TensorParallelError(f"unknown step {op} from rank 0")


class CompiledForward:
    """A follower's side of rank 0's compiled decode step: the model's forward through torch.compile,
    compiled at the first call rank 0 announces as compiled (its sampling stays on rank 0). Both
    compiled graphs make the same collectives in the same order, as functional collectives (tp.py).
    A compilation that fails falls back to the eager forward for good, as the engine's does: it
    makes the same collectives, so the ranks stay in step."""

    def __init__(self, model: Transformer, rank: int):
        self.model, self.rank = model, rank
        self.forward = None  # compiled at the first call; the model itself once compiling failed

    def __call__(self, tokens, input_pos=None, cache=None, last_only=False) -> torch.Tensor:
        if self.forward is None:
            for t in (*cache.k, *cache.v):  # as the engine marks its cache (DecodeStep._compile)
                torch._dynamo.mark_static(t)
            self.forward = torch.compile(self.model, dynamic=True, fullgraph=True, options=FORWARD_OPTIONS)
        try:
            return self.forward(tokens, input_pos, cache, last_only)
        except Exception as e:
            if self.forward is self.model:
                raise
            log.warning("rank %d: the compiled forward failed (%s: %s); replaying eagerly from now on",
                        self.rank, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            self.forward = self.model
            return self.model(tokens, input_pos, cache, last_only)


def _lost(shard: Shard, e: TensorParallelError) -> None:
    """A collective failed: another rank is gone or hung, and this group can do nothing more. Say
    so on one line and leave at once (exit handlers would wait on the broken group)."""
    print(f"mistral: rank {shard.rank} of {shard.world}: lost the other ranks of the tensor-parallel group "
          f"({e}); exiting", file=sys.stderr, flush=True)
    os._exit(1)
