"""Pages of memory-mapped weights: ask for them ahead of use, and let them go after.

A block offloaded to disk and computed on the CPU computes on tensors that are views
into a private mapping of a safetensors file; the kernel brings a page in on first
touch. A block whose pages are all in memory computes there in place. One that is
short of pages is read ahead into a reused buffer instead (``disk_reader``), so that
the disk stays busy and the compute never waits on a page fault; where no buffer can
take it, reading ahead (``MADV_WILLNEED``) turns the touch into a read that overlaps
the block before. Letting go (``MADV_DONTNEED``) unmaps pages so the process's resident
memory stays under a limit; the page cache keeps them, so touching them again costs a
minor fault, not a read. Measured on SmolLM2-135M: releasing every block after use costs
17–27 % of decode speed, which is why the default keeps pages mapped and leaves clean
file pages to the kernel's reclaim.
"""

import ctypes
import functools
import mmap
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from .disk_reader import DiskReader, ReadBlock, file_mappings

_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
# mincore sets bit 0 of a page's byte when the page is in memory; the other bits are reserved.
_RESIDENT_BIT = bytes(value & 1 for value in range(256))
# A block found in memory is looked at again after 1, 2, 4 … and at most this many of its runs.
_MAX_CHECK_INTERVAL = 32
# The kernel reads at most its read-ahead size (read_ahead_kb, 128 KiB unless a device sets
# more) for one MADV_WILLNEED call; advice for a whole block in one call left ~75 % of an
# 88 MiB block unread when it ran. Advice in pieces of the smallest default is honoured whole.
_ADVICE_PIECE_BYTES = 128 * 1024


@dataclass(frozen=True)
class PageRange:
    """Whole pages of the address space: ``start`` and ``length_bytes`` are page multiples."""

    start: int
    length_bytes: int


def page_ranges(tensors: Iterable[torch.Tensor]) -> tuple[PageRange, ...]:
    """The pages that hold ``tensors``' data, merged where tensors lie next to each other.

    >>> page_ranges([torch.empty(4096, dtype=torch.uint8)])  # doctest: +SKIP
    (PageRange(start=139..., length_bytes=4096),)
    """
    page = mmap.PAGESIZE
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors if t.nbytes)
    merged: list[list[int]] = []
    for start, end in spans:
        start -= start % page
        end += -end % page
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple(PageRange(start, end - start) for start, end in merged)


def unmap_pages(tensor: torch.Tensor) -> None:
    """Unmap the whole pages inside a tensor that views a file mapping: they stay in the page cache.

    For a view the caller no longer reads (its bytes were copied elsewhere). Pages shared
    with a neighbouring tensor stay mapped.

    >>> unmap_pages(checkpoint.tensor("model.layers.0.mlp.up_proj.weight"))  # doctest: +SKIP
    """
    libc = _libc()
    page = mmap.PAGESIZE
    start = tensor.data_ptr() + (-tensor.data_ptr() % page)
    end = tensor.data_ptr() + tensor.nbytes
    end -= end % page
    if libc is not None and end > start:
        libc.madvise(start, end - start, _MADV_DONTNEED)


def file_backed(ranges: Iterable[PageRange]) -> bool:
    """Whether every range lies in a mapping of a file, which unmapping cannot lose data of.

    Only Linux says so (``/proc/self/maps``); elsewhere the answer is False.

    >>> file_backed(page_ranges([torch.empty(4096, dtype=torch.uint8)]))
    False
    """
    mappings = file_mappings()
    return bool(mappings) and all(
        any(mapping.start <= item.start and item.start + item.length_bytes <= mapping.end for mapping in mappings)
        for item in ranges
    )


class HostPager:
    """Reads the pages of CPU-computed disk blocks ahead of use, and keeps their mapped bytes under a limit.

    Blocks of ``readable`` that are short of pages are read into the ``DiskReader``'s
    slots; the others, and those no slot can take, get read-ahead advice for their mapping.
    ``resident_limit_bytes`` ``None`` never unmaps: the kernel reclaims clean file pages
    when memory runs short. With a limit, the blocks used longest ago are unmapped after
    use until the mapped bytes of disk blocks fit under it. Blocks whose tensors are not
    views of a file are never unmapped (that would lose their data).
    """

    def __init__(
        self,
        ranges: Mapping[str, tuple[PageRange, ...]],
        executor: Executor,
        resident_limit_bytes: int | None = None,
        readable: Sequence[ReadBlock] = (),
    ):
        self._ranges = dict(ranges)
        self._executor = executor
        self._limit_bytes = resident_limit_bytes
        self._releasable = {name for name, block in self._ranges.items() if file_backed(block)}
        self._mapped: OrderedDict[str, int] = OrderedDict()
        # Blocks whose pages may not be mapped (let go, or last run from a slot): looking at
        # them costs a page-cache lookup per page, so the thread looks.
        self._unmapped: set[str] = set()
        self._interval = dict.fromkeys(self._ranges, 1)
        self._countdown = dict.fromkeys(self._ranges, 1)
        self._libc = _libc()
        readable = [block for block in readable if block.name in self._ranges] if self._libc is not None else []
        self._reader = DiskReader(readable, executor, self._needs_reading)

    def prepare(self, name: str) -> None:
        """Block ``name`` runs next: unless it was in memory when last looked at, have a slot read it."""
        if self._libc is not None and (self._interval[name] == 1 or self._reader.holds(name)):
            self._reader.prepare(name)

    def fetch_ahead(self, name: str) -> None:
        """Have the background thread start reading block ``name``, or its pages that are not in memory.

        Looking costs ~5 µs per 7 MB of mapped pages, less than handing work to the thread,
        so it happens here; and a block found in memory is looked at after 1, 2, 4 … up to
        ``_MAX_CHECK_INTERVAL`` of its runs, while one found short is looked at every run.
        """
        if self._libc is None:
            return
        if self._reader.holds(name):
            self._reader.fetch_ahead(name)
            return
        self._countdown[name] -= 1
        if self._countdown[name] > 0:
            return
        if name in self._unmapped:
            if not self._reader.fetch_ahead(name):
                self._executor.submit(self._read_ahead, name)
            short = True
        else:
            short = self._short(name)
            if short and not self._reader.fetch_ahead(name):
                self._executor.submit(self._advise_will_need, short)
        self._interval[name] = 1 if short else min(2 * self._interval[name], _MAX_CHECK_INTERVAL)
        self._countdown[name] = self._interval[name]

    def _read_ahead(self, name: str) -> None:
        self._advise_will_need(self._short(name))

    def _needs_reading(self, name: str) -> bool:
        return bool(self._short(name))

    def _short(self, name: str) -> tuple[PageRange, ...]:
        """The ranges of block ``name`` with pages not in memory (mapped or in the page cache)."""
        return tuple(item for item in self._ranges[name] if not self._resident(item))

    def _advise_will_need(self, ranges: tuple[PageRange, ...]) -> None:
        for item in ranges:
            for start in range(item.start, item.start + item.length_bytes, _ADVICE_PIECE_BYTES):
                length = min(_ADVICE_PIECE_BYTES, item.start + item.length_bytes - start)
                self._libc.madvise(start, length, _MADV_WILLNEED)

    def bind(self, name: str) -> None:
        """Point block ``name`` at its slot if it was read into one; else it computes on its mapping in place."""
        self._reader.bind(name)

    def unbind(self, name: str) -> None:
        """Note that block ``name`` ran; unmap the oldest blocks while over the limit."""
        if self._reader.unbind(name):
            # It ran from a slot: its mapping was not touched.
            self._unmapped.add(name)
            return
        # Running touched every page of the block: they are mapped again.
        self._unmapped.discard(name)
        if self._limit_bytes is None or name not in self._releasable:
            return
        self._mapped.pop(name, None)
        self._mapped[name] = sum(item.length_bytes for item in self._ranges[name])
        while sum(self._mapped.values()) > self._limit_bytes and len(self._mapped) > 1:
            oldest, _ = self._mapped.popitem(last=False)
            self.release(oldest)

    def release(self, name: str) -> None:
        """Unmap block ``name``'s pages now (they stay in the page cache). Only file-backed blocks."""
        if self._libc is None or name not in self._releasable:
            return
        for item in self._ranges[name]:
            self._libc.madvise(item.start, item.length_bytes, _MADV_DONTNEED)
        self._unmapped.add(name)

    def _resident(self, item: PageRange) -> bool:
        pages = item.length_bytes // mmap.PAGESIZE
        vector = ctypes.create_string_buffer(pages)
        if self._libc.mincore(item.start, item.length_bytes, vector) != 0:
            return False
        return b"\x00" not in vector.raw[:pages].translate(_RESIDENT_BIT)


@functools.cache
def _libc():
    """The C library's madvise and mincore, or None where there are none (Windows)."""
    if sys.platform == "win32":
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc
