"""The engine's paged KV cache: a pool of fixed-size blocks per layer, and a block table per row.

    k[layer], v[layer]      [num_blocks, block_size, Hkv, D]   the pool; block 0 is a scratch block
    block_table             [rows, max_seq_len / block_size]   row b's position p lives in
                                                               block block_table[b, p // block_size],
                                                               slot p % block_size

A sequence holds only the blocks its tokens need, so short sequences leave room for more, and a
block can be read by several rows at once: that is how a prompt prefix computed once (a system
prompt, the earlier turns of a conversation) is reused (`BlockPool` keeps such blocks by the hash
of their tokens). Table entries a row does not use point at the scratch block 0, which no sequence
holds: rows with nothing to do (a decode batch covers every row below its highest busy one) write
there, and attention masks what it reads there.

`PagedKVCache` has the contiguous `model.KVCache`'s interface (`view`, `update`, `read`): `read`
gathers a row's blocks into [B, Hkv, L, D], so the model and its attention stay as they are. An
attention that reads blocks where they lie (the "cpu" and "triton" backends', for decode steps:
mistral/ops.py) gets `Pages` from `update` instead, and no copy is made: a cache built with
`in_place=True` (as `Transformer.new_paged_cache` builds it when `ops.attention.reads_pages` says so).

`PackedView` is the view of a mixed step (engine.py): the decode rows' tokens and prompt chunks in
one forward, one token a row, so that the linear layers read their weights once for all of them;
attention stays per sequence (`Parts`, `per_sequence`).
"""

from __future__ import annotations

import collections
import hashlib
import struct

import torch

from .args import ModelArgs

BLOCK_SIZE = 16


class Pages:
    """One layer's keys (or values) as the pool holds them, for an attention that reads them in place:
    row b's position j is pool[block_table[b, j // block_size], j % block_size] ([Hkv, D]), for j <
    length. `gather()` is the [B, Hkv, length, D] tensor `PagedKVCache.read` would have given."""

    def __init__(self, pool: torch.Tensor, block_table: torch.Tensor, length: int):
        self.pool = pool  # [num_blocks, block_size, Hkv, D]
        self.block_table = block_table  # [B, n] int64
        self.length = length

    def gather(self) -> torch.Tensor:
        bs = self.pool.shape[1]
        table = self.block_table[:, : -(-self.length // bs)]  # [B, n]
        B, n = table.shape
        # index_select copies whole blocks: on a CPU twice as fast as the same gather by pool[table]
        rows = self.pool.index_select(0, table.reshape(-1))  # [B·n, block_size, Hkv, D]
        return rows.view(B, n * bs, *self.pool.shape[2:])[:, : self.length].transpose(1, 2)


class PagedKVCache:
    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor], block_table: torch.Tensor, length: int,
                 in_place: bool = False):
        self.k, self.v = k, v
        self.block_table = block_table  # [B, blocks per row] int64
        self.length = length  # positions attention reads
        self.in_place = in_place  # update() returns Pages (attention reads the pool) rather than a gathered copy

    @classmethod
    def allocate(cls, args: ModelArgs, num_blocks: int, max_batch: int, max_seq_len: int,
                 block_size: int = BLOCK_SIZE, device=None, dtype=None, in_place: bool = False) -> "PagedKVCache":
        shape = (num_blocks, block_size, args.n_kv_heads, args.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        table = torch.zeros(max_batch, -(-max_seq_len // block_size), dtype=torch.long, device=device)
        return cls(k, v, table, table.shape[1] * block_size, in_place)

    @property
    def block_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.block_table.shape[1] * self.block_size

    def view(self, start: int = 0, stop: int | None = None, length: int | None = None) -> "PagedKVCache":
        """Rows start..stop of the block table (no copy), with attention reading `length` positions."""
        return self.with_table(self.block_table[start:stop], length)

    def with_table(self, block_table: torch.Tensor, length: int | None = None) -> "PagedKVCache":
        """The same pool read and written through `block_table` ([B, n] int64, n ≥ length / block_size)."""
        length = self.max_seq_len if length is None else min(length, self.max_seq_len)
        return PagedKVCache(self.k, self.v, block_table, length, self.in_place)

    def update(
        self, layer: int, input_pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[Pages, Pages]:
        """Write xk, xv ([B, T, Hkv, D]) at positions input_pos[b] + t; return this layer's keys
        and values as [B, Hkv, length, D] (`in_place`: as `Pages`)."""
        self.write(layer, input_pos, xk, xv)
        if self.in_place:
            return self.pages(layer)
        return self.read(layer)

    def pages(self, layer: int) -> tuple[Pages, Pages]:
        """This layer's keys and values where they lie in the pool."""
        return (Pages(self.k[layer], self.block_table, self.length),
                Pages(self.v[layer], self.block_table, self.length))

    def write(self, layer: int, input_pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> None:
        """Write xk, xv ([B, T, Hkv, D]) into the pool at positions input_pos[b] + t."""
        T, bs = xk.shape[1], self.block_size
        pos = input_pos[:, None] + torch.arange(T, device=xk.device)  # [B, T]
        blocks = self.block_table.gather(1, pos // bs)  # [B, T]
        self.k[layer][blocks, pos % bs] = xk  # the indexed view is [B, T, Hkv, D]
        self.v[layer][blocks, pos % bs] = xv

    def copy_in(self, copy_k: list[torch.Tensor], copy_v: list[torch.Tensor]) -> None:
        """Gather row 0's `length` positions into a contiguous copy (StagedView's: [1, Hkv, S, D] a layer)."""
        if self.length > 0:
            for layer, (k, v) in enumerate(zip(copy_k, copy_v)):
                pk, pv = self.read(layer)  # [1, Hkv, length, D]
                k[:1, :, : self.length] = pk[:1]
                v[:1, :, : self.length] = pv[:1]

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's keys and values of every row, gathered from its blocks: [B, Hkv, length, D]."""
        keys, values = self.pages(layer)
        return keys.gather(), values.gather()


class StagedView(PagedKVCache):
    """One prefilling sequence's view of the pool (its table [1, n]) that also keeps its keys and
    values in a contiguous copy, and attention reads them from there: a prompt chunk late in a long
    prompt then reads its prefix as it is, instead of gathering it block by block from the pool at
    every layer of every chunk (8,000 positions: 544 blocks a layer, twice).

        copy_k[layer], copy_v[layer]    [1, Hkv, max_seq_len, D]   position p at [0, :, p]

    The copy must hold the sequence's positions before the chunk (`PrefillStep` sees to it, with
    `PagedKVCache.copy_in`); the pool is written as by `PagedKVCache`, for the decode steps and the
    prefix cache."""

    def __init__(self, paged: PagedKVCache, copy_k: list[torch.Tensor], copy_v: list[torch.Tensor]):
        super().__init__(paged.k, paged.v, paged.block_table, paged.length)
        self.copy_k, self.copy_v = copy_k, copy_v

    def update(
        self, layer: int, input_pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write xk, xv ([1, T, Hkv, D]) at positions input_pos[0] + t, in the pool and the copy; this
        layer's keys and values from the copy, [1, Hkv, length, D] views."""
        self.write(layer, input_pos, xk, xv)
        pos = input_pos[0] + torch.arange(xk.shape[1], device=xk.device)  # [T]
        k, v = self.copy_k[layer], self.copy_v[layer]
        k[0].index_copy_(1, pos, xk[0].transpose(0, 1))  # [Hkv, T, D] into [Hkv, max_seq_len, D]
        v[0].index_copy_(1, pos, xv[0].transpose(0, 1))
        return k[:, :, : self.length], v[:, :, : self.length]

class PackedView:
    """The new tokens of several sequences in one forward, one token a row: tokens [N, 1], input_pos [N].

    `parts` cut the N rows into consecutive groups, each with its own view of the pool:
    `(rows, cache, chunk)`, where `cache` is a `PagedKVCache` view (a block table, a length) and
    `chunk` says that its rows are consecutive tokens of one sequence (a prompt chunk, its table
    [1, n]) rather than one token of each of its rows (decode rows, its table [rows, n]). Each part
    is written and read exactly as a forward of its own would do it, so attention (through
    `per_sequence`) gives every part the bits it would get alone; only the layers around attention
    see the N rows at once.
    """

    def __init__(self, parts: list[tuple[slice, PagedKVCache, bool]]):
        self.parts = parts

    def update(self, layer: int, input_pos: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> tuple["Parts", "Parts"]:
        """Write each part's xk, xv ([N, 1, Hkv, D]) through its own view; its keys and values, as `Parts`."""
        keys, values = [], []
        for rows, cache, chunk in self.parts:
            k, v = cache.update(layer, *_as_forward(rows, chunk, input_pos, xk, xv))
            keys.append(k)
            values.append(v)
        return Parts(self, keys), Parts(self, values)


class Parts(list):
    """Keys (or values) of a `PackedView`, one [b, Hkv, L, D] tensor a part, each at its own length."""

    def __init__(self, view: PackedView, tensors: list[torch.Tensor]):
        super().__init__(tensors)
        self.view = view


def _as_forward(rows: slice, chunk: bool, input_pos: torch.Tensor, *xs: torch.Tensor):
    """A part's positions and tensors ([N, 1, ...] rows) shaped as its own forward has them: a chunk's
    rows as one row of T tokens ([1, T, ...], starting at its first position), decode rows as they are."""
    if chunk:
        return (input_pos[rows.start : rows.start + 1], *(x[rows].transpose(0, 1) for x in xs))
    return (input_pos[rows], *(x[rows] for x in xs))


def per_sequence(attention, reads_pages: bool = False):
    """`attention` (an `Ops.attention`) that also takes the keys and values of a `PackedView`: each
    part attends over its own keys, by the same call a forward of its own would make. `reads_pages`:
    `attention` also takes `Pages` (so the engine's cache is built `in_place`)."""

    def attend(xq, keys, values, input_pos, sliding_window):  # xq [N, 1, H, D] for a PackedView
        if not isinstance(keys, Parts):
            return attention(xq, keys, values, input_pos, sliding_window)
        outs = []
        for (rows, _, chunk), k, v in zip(keys.view.parts, keys, values):
            pos, q = _as_forward(rows, chunk, input_pos, xq)
            out = attention(q, k, v, pos, sliding_window)
            outs.append(out.transpose(0, 1) if chunk else out)
        return torch.cat(outs)  # [N, 1, H, D]

    attend.per_sequence = True
    attend.reads_pages = reads_pages
    return attend


def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for one block of positions."""
    return 2 * args.n_layers * block_size * args.n_kv_heads * args.head_dim * dtype.itemsize


class BlockPool:
    """Which blocks of the pool are free, held by sequences, or kept as a cached prompt prefix.

    Prefix caching: a full block is known by a hash of its tokens chained with the hash of every
    block before it, so equal hashes mean the same tokens at the same positions after the same
    prefix, hence the same keys and values. A finished (or fully prefilled) sequence `register`s its
    full blocks; a new prompt `match`es the longest chain of them and prefills only the rest.
    A cached block nobody holds stays in the pool until a new block is needed and none is free;
    then the least recently used one is evicted. Block 0 is the scratch block, never handed out.
    Host-side bookkeeping only; the engine's thread alone calls it.
    """

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free = collections.deque(range(1, num_blocks))
        self.refs = [0] * num_blocks
        self.cached: dict[bytes, int] = {}  # chained hash -> block
        self.hash_of: dict[int, bytes] = {}  # block -> its chained hash, for cached blocks
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # unheld cached blocks, LRU first

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    @property
    def used(self) -> int:
        """Blocks held by sequences or kept as cached prefix blocks."""
        return self.capacity - len(self.free)

    @property
    def available(self) -> int:
        """Blocks a new sequence could take now: the free ones and the unheld cached ones (evictable)."""
        return len(self.free) + len(self.evictable)

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def _hashes(self, tokens: list[int], known: list[bytes] | None = None):
        """The chained hash of each full block of `tokens`, in order. `known` holds those of its first
        blocks, hashed before: only the blocks after them are hashed, and appended to it (a prompt
        read in chunks hashes each block once, not its whole prefix again at every chunk)."""
        known = [] if known is None else known
        bs, done = self.block_size, len(known)
        yield from known[: len(tokens) // bs]
        h = known[-1] if known else b""
        for i in range(done, len(tokens) // bs):
            h = hashlib.sha256(h + struct.pack(f"<{bs}q", *tokens[i * bs : (i + 1) * bs])).digest()
            known.append(h)
            yield h

    def match(self, tokens: list[int]) -> list[int]:
        """The cached blocks that hold the longest prefix of `tokens`, in full blocks."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h in self._hashes(tokens):
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def can_allocate(self, prefix: list[int], n_new: int) -> bool:
        """Whether `acquire(prefix, n_new)` can succeed now."""
        return n_new <= self.available - sum(b in self.evictable for b in prefix)

    def acquire(self, prefix: list[int], n_new: int) -> list[int]:
        """Hold the cached blocks `prefix` and `n_new` new ones (evicting unheld cached blocks, least
        recently used first, when none is free); the blocks of a row in order."""
        for block in prefix:  # first, so that none of them is evicted below
            self.refs[block] += 1
            self.evictable.pop(block, None)
        new = []
        for _ in range(n_new):
            if self.free:
                block = self.free.popleft()
            else:
                block, _ = self.evictable.popitem(last=False)
                del self.cached[self.hash_of.pop(block)]
            self.refs[block] = 1
            new.append(block)
        return prefix + new

    def register(self, blocks: list[int], tokens: list[int], known: list[bytes] | None = None) -> None:
        """Offer the full blocks of `tokens` (written in `blocks`, in order) to the prefix cache. A block
        whose tokens another block already holds stays private to its sequence. `known`: the hashes of
        the sequence's blocks registered before (see `_hashes`), extended here."""
        if not self.prefix_caching:
            return
        for block, h in zip(blocks, self._hashes(tokens, known)):
            if h not in self.cached and block not in self.hash_of:
                self.cached[h], self.hash_of[block] = block, h

    def release(self, blocks: list[int]) -> None:
        """A sequence lets go of its blocks: cached ones stay (most recently used last), others are free."""
        for block in reversed(blocks):  # a chain's last blocks are evicted before its first
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None
                else:
                    self.free.append(block)
