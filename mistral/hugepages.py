"""Weights on the CPU in 2 MiB pages (Linux transparent huge pages), for decode speed.

A decode step streams every weight from memory once. In 4 KiB pages that is a TLB miss every 4 KiB
and a hardware prefetcher that stops at each page's end; in 2 MiB pages, neither. PyTorch's CPU
allocator asks for no huge pages, and a kernel whose transparent huge pages are in `madvise` mode
(the common default) gives none unasked, so `to_huge_pages` copies the model's large tensors into
one anonymous mapping advised MADV_HUGEPAGE, storage by storage: tensors that share a storage (a
merged projection and the views its parts keep, merged.py) share it there too, and each old storage
is freed once its tensors point at the new one, so memory peaks at the model plus one storage.

Only storages the loader allocated move (quantized, converted to another dtype, merged): a tensor
that maps the checkpoint file (the file's own dtype on the CPU: no copy, loader.py) stays mapped, so
that such a load keeps its resident memory at the file's size.

On an AMD EPYC (Zen 4) VM the int4 / int8 CPU kernels streamed 10-30% faster from huge pages
(BENCHMARKS.md, "Weights in huge pages"); the copy costs about a second per GB moved at load.
Elsewhere (no THP, not Linux) this does nothing.
"""

from __future__ import annotations

import logging
import mmap
import weakref
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MIN_BYTES = 1 << 20  # smaller storages (norms, biases) stay where they are: too few pages to matter
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_regions: list[tuple[int, int, weakref.ref]] = []  # the mappings made here: their storages are not moved again


def available() -> bool:
    """Whether this kernel gives huge pages to a region that asks (THP mode `always` or `madvise`)."""
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return False
    return "[never]" not in mode and hasattr(mmap, "MADV_HUGEPAGE")


def _file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's file mappings, from /proc/self/maps."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                lo, hi = fields[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def to_huge_pages(model: nn.Module) -> int:
    """Move the CPU storages of `model`'s parameters and buffers of at least MIN_BYTES into huge
    pages, in place (every tensor keeps its identity, shape, strides and values); the bytes moved.
    Call it before compiling: the tensors' addresses change."""
    if not available():
        return 0
    _regions[:] = [r for r in _regions if r[2]() is not None]
    stay = _file_mappings() + [(lo, hi) for lo, hi, _ in _regions]
    groups: dict[int, list[torch.Tensor]] = {}  # storage address -> the tensors on it
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.device.type != "cpu" or tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes() >= MIN_BYTES and not any(lo <= storage.data_ptr() < hi for lo, hi in stay):
            group = groups.setdefault(storage.data_ptr(), [])
            if not any(t is tensor for t in group):
                group.append(tensor)
    if not groups:
        return 0
    sizes = [groups[ptr][0].untyped_storage().nbytes() for ptr in groups]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // 4096) * 4096
    try:
        region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        arena = torch.frombuffer(region, dtype=torch.uint8)  # holds `region` for as long as a tensor lives on it
        start = -arena.data_ptr() % HUGE_PAGE
        region.madvise(mmap.MADV_HUGEPAGE, start, total)  # before the first touch: the pages fault in huge
    except (OSError, ValueError) as e:  # no address space for it (strict overcommit), or no THP after all
        log.debug("tensors stay in their pages: %s", e)
        return 0
    _regions.append((arena.data_ptr(), arena.data_ptr() + len(region), weakref.ref(region)))
    with torch.no_grad():
        for tensors, offset, size in zip(groups.values(), offsets, sizes):
            new = arena[start + offset:start + offset + size]
            new.copy_(torch.empty(0, dtype=torch.uint8).set_(tensors[0].untyped_storage()))
            storage = new.untyped_storage()
            for t in tensors:
                t.set_(storage, (start + offset) // t.element_size() + t.storage_offset(), t.shape, t.stride())
    _release_freed_memory()
    log.debug("moved %d storages, %.0f MB, into huge pages", len(sizes), total / 1e6)
    return total


def _release_freed_memory() -> None:
    """Give the old storages' memory back to the system: storages under glibc's mmap threshold
    (up to 32 MiB) came from its heap, which keeps freed memory until asked to trim it."""
    import ctypes
    import gc

    gc.collect()  # reference cycles left by loading can still hold old storages
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass
