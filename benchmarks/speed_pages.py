"""Make the disk blocks of a loaded model cold again, as they are when the model is bigger than memory.

The kernel keeps a file's pages in its page cache after a read, and a process keeps
the pages it mapped. ``posix_fadvise(POSIX_FADV_DONTNEED)`` drops cached pages but
skips those a process has mapped, and would report a cold run as warm; so the
process's own mappings of those bytes are unmapped first (``MADV_DONTNEED``), then the
page cache is asked to drop them. The weights are never written, so unmapping loses
nothing: the next touch reads the file again. Linux only (``/proc/self/maps``).
"""

import ctypes
import functools
import mmap
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from devicemap.storage.safetensors_file import read_safetensors_header

_MADV_DONTNEED = 4


@dataclass(frozen=True)
class FileRange:
    """Bytes ``[start, end)`` of the file at ``path``."""

    path: str
    start: int
    end: int


def disk_ranges(folder: Path, device_map: Mapping[str, object]) -> tuple[FileRange, ...]:
    """The byte ranges of the folder's safetensors files that hold tensors ``device_map`` puts on "disk".

    A tensor goes where the longest module-name prefix of it in ``device_map`` says.

    >>> disk_ranges(Path("tinyllama"), {"model.layers.0": "disk", "model": "cpu"})  # doctest: +SKIP
    (FileRange(path='.../model-00001-of-00005.safetensors', start=262144136, end=350568584),)
    """
    ranges = []
    for path in sorted(folder.glob("*.safetensors")):
        for info in read_safetensors_header(path).values():
            if _device_of(info.name, device_map) == "disk" and info.end_byte > info.start_byte:
                ranges.append(FileRange(str(path.resolve()), info.start_byte, info.end_byte))
    return tuple(ranges)


def _device_of(name: str, device_map: Mapping[str, object]) -> object:
    prefixes = [prefix for prefix in device_map if prefix == "" or name == prefix or name.startswith(prefix + ".")]
    return device_map[max(prefixes, key=len)] if prefixes else None


def whole_files(paths: Iterable[Path]) -> tuple[FileRange, ...]:
    """Every byte of each file of ``paths``."""
    return tuple(FileRange(str(path.resolve()), 0, path.stat().st_size) for path in paths)


def drop_pages(ranges: Iterable[FileRange]) -> None:
    """Unmap the whole pages of ``ranges`` from this process's mappings, then drop them from the page cache.

    >>> drop_pages(disk_ranges(Path("tinyllama"), {"model.layers": "disk"}))  # doctest: +SKIP
    """
    by_path: dict[str, list[FileRange]] = {}
    for item in merged(ranges):
        by_path.setdefault(item.path, []).append(item)
    libc = _libc()
    for low, high, offset, path in _file_mappings():
        for item in by_path.get(path, ()):
            start = max(low, low + item.start - offset)
            end = min(high, low + item.end - offset)
            start += -start % mmap.PAGESIZE
            end -= end % mmap.PAGESIZE
            if end > start:
                libc.madvise(start, end - start, _MADV_DONTNEED)
    for path, items in by_path.items():
        descriptor = os.open(path, os.O_RDONLY)
        try:
            for item in items:
                os.posix_fadvise(descriptor, item.start, item.end - item.start, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def merged(ranges: Iterable[FileRange]) -> tuple[FileRange, ...]:
    """``ranges`` with those that touch or overlap in one file joined.

    The page cache holds a file in folios of up to a few MiB, and dropping a range keeps
    the folios it only partly covers: each tensor alone would keep the folios it shares
    with its neighbours, hundreds of MB for a 1.1B model's layers.

    >>> merged([FileRange("a", 10, 20), FileRange("b", 0, 5), FileRange("a", 0, 10)])
    (FileRange(path='a', start=0, end=20), FileRange(path='b', start=0, end=5))
    """
    joined: list[FileRange] = []
    for item in sorted(ranges, key=lambda item: (item.path, item.start)):
        if joined and joined[-1].path == item.path and item.start <= joined[-1].end:
            joined[-1] = FileRange(item.path, joined[-1].start, max(joined[-1].end, item.end))
        else:
            joined.append(item)
    return tuple(joined)


def read_bytes() -> int:
    """Bytes this process has caused to be read from storage so far (``read_bytes`` of ``/proc/self/io``).

    Every thread's reads count, page faults and read-ahead included; reads served from
    the page cache do not.
    """
    with open("/proc/self/io") as counters:
        for line in counters:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no read_bytes line; this kernel does not count I/O per process")


def last_read_s(quiet_s: float = 0.005) -> float:
    """Wait until this process has started no disk read for ``quiet_s``; the clock time its last one started.

    A read ahead for the next step may still be under way when a step ends: its time
    belongs to the steps, not to the dropping of pages that comes next.

    >>> last_read_s(0.001) <= time.perf_counter()
    True
    """
    last_s, seen = time.perf_counter(), read_bytes()
    while time.perf_counter() - last_s < quiet_s:
        time.sleep(quiet_s / 10)
        now = read_bytes()
        if now != seen:
            last_s, seen = time.perf_counter(), now
    return last_s


def _file_mappings() -> list[tuple[int, int, int, str]]:
    """This process's mappings of files: (low address, high address, file offset of low, path)."""
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                mappings.append((low, high, int(fields[2], 16), fields[5].rstrip("\n")))
    return mappings


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc
