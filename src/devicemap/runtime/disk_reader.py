"""Disk blocks computed on the CPU, read ahead of use into reused host buffers.

A block kept on disk computes on the CPU out of a memory mapping of its file. When its
pages are not in memory (a model bigger than memory), computing on the mapping reads
them through page faults, and read-ahead advice for a mapping is honoured only up to the
device's read-ahead size per call: measured on a 1.1B model whose pages were dropped
before every step, ~90 % of each block was read through page faults while it computed,
and the disk waited on the compute. Instead the reader thread reads such a block with
``preadv`` into a slot: host memory for one block, taken by the blocks in turn, so that
the next block is read while one computes and the compute never faults. While a block
runs its parameters point into its slot, and back at the mapping after.

There are ``STREAM_COPIES`` slots, the room the plan's ledger keeps on the CPU for
offloaded blocks (one computing, one arriving), each the size of the largest block
(plus under 64 bytes per file run, for alignment). A block runs from its mapping when
its pages are all in memory already (reading would only copy them), when its tensors
are not views of a file, or when every slot is taken.
"""

import mmap
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass
from itertools import count

import torch
from torch import nn

from ..errors import DeviceMapError
from ..planning.ledger import STREAM_COPIES

# A run starts in a slot at the same offset within a cache line as in its file, so that
# each tensor is aligned in the slot as in its mapping, and vectorised kernels (whose
# results may depend on alignment) compute on it the same way.
_ALIGN_BYTES = 64


@dataclass(frozen=True)
class FileMapping:
    """Addresses ``[start, end)`` of this process that map file ``path`` from byte ``offset``."""

    start: int
    end: int
    offset: int
    path: str


@dataclass(frozen=True)
class ReadBlock:
    """A block that may run from a slot: its parameters, each ``(module._parameters, key)``."""

    name: str
    parameters: tuple[tuple[dict, str], ...]


@dataclass(frozen=True)
class FileRun:
    """Bytes ``[offset, offset + length_bytes)`` of file ``path``, read to ``slot_offset`` of a slot."""

    path: str
    offset: int
    length_bytes: int
    slot_offset: int


@dataclass(frozen=True)
class _Layout:
    """Where a block's bytes come from and where its parameters lie in a slot."""

    runs: tuple[FileRun, ...]
    parameters: tuple[tuple[dict, str], ...]
    originals: tuple[nn.Parameter, ...]
    slot_offsets: tuple[int, ...]
    size_bytes: int


def file_mappings() -> tuple[FileMapping, ...]:
    """This process's mappings of files; none where the system does not say (it is Linux's ``/proc/self/maps``).

    >>> all(mapping.path.startswith("/") for mapping in file_mappings())
    True
    """
    if not sys.platform.startswith("linux"):
        return ()
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            # Anonymous mappings have no path; "[heap]" and the like are not files either.
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                mappings.append(FileMapping(start, end, int(fields[2], 16), fields[5].rstrip("\n")))
    return tuple(mappings)


def lay_out(
    tensors: Sequence[torch.Tensor], mappings: Sequence[FileMapping]
) -> tuple[tuple[FileRun, ...], tuple[int, ...]] | None:
    """The file runs that hold ``tensors`` and each tensor's byte offset in a slot; None unless all are file views.

    Tensors that lie next to each other in a file are read in one run; runs follow each
    other in the slot, each at the same offset within ``_ALIGN_BYTES`` as in its file.

    >>> lay_out([torch.zeros(4)], file_mappings()) is None
    True
    """
    located = []
    for index, tensor in enumerate(tensors):
        place = _locate(tensor, mappings)
        if place is None or not tensor.is_contiguous():
            return None
        located.append((*place, tensor.nbytes, index))
    runs: list[list] = []  # [path, offset, end, slot offset]
    offsets = [0] * len(tensors)
    slot_end = 0
    for path, offset, nbytes, index in sorted(located):
        if not runs or runs[-1][0] != path or offset > runs[-1][2]:
            start = slot_end + (offset - slot_end) % _ALIGN_BYTES
            runs.append([path, offset, offset + nbytes, start])
        run = runs[-1]
        run[2] = max(run[2], offset + nbytes)
        offsets[index] = run[3] + offset - run[1]
        slot_end = run[3] + run[2] - run[1]
    return tuple(FileRun(path, offset, end - offset, start) for path, offset, end, start in runs), tuple(offsets)


def _locate(tensor: torch.Tensor, mappings: Sequence[FileMapping]) -> tuple[str, int] | None:
    """The file and byte offset of ``tensor``'s data, when a file mapping holds all of it."""
    low, high = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    for mapping in mappings:
        if mapping.start <= low and high <= mapping.end:
            # A file removed since it was mapped cannot be opened again by its name.
            if mapping.path.endswith(" (deleted)"):
                return None
            return mapping.path, mapping.offset + low - mapping.start
    return None


def read_runs(runs: Sequence[FileRun], memory: memoryview) -> None:
    """Read each run's bytes of its file into ``memory`` at its slot offset.

    >>> read_runs([], memoryview(bytearray(1)))
    """
    for run in runs:
        descriptor = os.open(run.path, os.O_RDONLY)
        try:
            done = 0
            while done < run.length_bytes:
                target = memory[run.slot_offset + done : run.slot_offset + run.length_bytes]
                got = os.preadv(descriptor, [target], run.offset + done)
                if got == 0:
                    raise DeviceMapError(
                        f"{run.path} ended at byte {run.offset + done} while {run.length_bytes} bytes from byte "
                        f"{run.offset} were being read for a block on disk: the file was cut short after the "
                        "model was loaded; load the model again from complete files"
                    )
                done += got
        finally:
            os.close(descriptor)


class _Slot:
    """Host memory for one block at a time, and what is in it."""

    def __init__(self, size_bytes: int):
        # An anonymous mapping starts on a page: runs keep their offset within _ALIGN_BYTES.
        # A private one is plain process memory (a shared one would be a "/dev/zero" file).
        self.memory = mmap.mmap(-1, max(size_bytes, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.bytes = torch.frombuffer(self.memory, dtype=torch.uint8)
        self.holder: str | None = None  # the block whose bytes are in the slot, or being read into it
        self.claimed = False  # its holder runs next or now: the slot is not to be given to another block
        self.bound = False  # its holder's parameters point into the slot now
        self.read: Future | None = None  # True once read; False when the block was all in memory, not read
        self.used = 0  # when it was last let go: the slot let go longest ago is taken first


class DiskReader:
    """Reads disk blocks into ``STREAM_COPIES`` reused slots on ``executor``'s thread, ahead of their use.

    ``needs_reading(name)`` runs on that thread just before a read: a block whose pages
    are all in memory is not read, and runs on its mapping. Blocks that are not views of
    a file are left out. The main thread calls ``fetch_ahead`` for blocks to come,
    ``prepare``, ``bind`` and ``unbind`` around a block's forward.

    >>> reader = DiskReader([], executor=None, needs_reading=lambda name: True)
    >>> reader.fetch_ahead("model.layers.0")
    False
    """

    def __init__(self, blocks: Sequence[ReadBlock], executor: Executor, needs_reading: Callable[[str], bool]):
        self._executor = executor
        self._needs_reading = needs_reading
        mappings = file_mappings() if blocks else ()
        self._layouts = {}
        for block in blocks:
            layout = _layout_of(block, mappings)
            if layout is not None:
                self._layouts[block.name] = layout
        slot_bytes = max((layout.size_bytes for layout in self._layouts.values()), default=0)
        self._slots = [_Slot(slot_bytes) for _ in range(STREAM_COPIES if self._layouts else 0)]
        self._views = {
            name: [_views_in(slot.bytes, layout) for slot in self._slots] for name, layout in self._layouts.items()
        }
        self._clock = count(1)

    @property
    def buffer_bytes(self) -> int:
        """Host memory the slots hold."""
        return sum(len(slot.memory) for slot in self._slots)

    def holds(self, name: str) -> bool:
        """Whether block ``name``'s bytes are in a slot, or on their way there."""
        return self._slot_of(name) is not None

    def fetch_ahead(self, name: str) -> bool:
        """Start reading block ``name`` into a free slot; whether it has one (False: none is free)."""
        if name not in self._layouts:
            return False
        slot = self._slot_of(name) or self._free_slot()
        if slot is None:
            return False
        self._claim(slot, name)
        return True

    def prepare(self, name: str) -> bool:
        """Block ``name`` runs next: have a slot read it, taken from a block still to come if none is free.

        False when it cannot have one (not a file view, or every slot in use by a running block).
        """
        if name not in self._layouts:
            return False
        slot = self._slot_of(name) or self._free_slot() or self._waiting_slot()
        if slot is None:
            return False
        self._claim(slot, name)
        return True

    def bind(self, name: str) -> None:
        """Point block ``name``'s parameters into its slot once it is read; nothing if it has none or was not read."""
        slot = self._slot_of(name)
        if slot is None or not slot.claimed:
            return
        try:
            was_read = slot.read.result()  # raises here whatever went wrong on the reader thread
        except BaseException:
            slot.holder, slot.claimed = None, False
            raise
        if not was_read:
            slot.holder, slot.claimed = None, False
            return
        layout = self._layouts[name]
        for (owner, key), view in zip(layout.parameters, self._views[name][self._slots.index(slot)]):
            owner[key] = view
        slot.bound = True

    def unbind(self, name: str) -> bool:
        """Point block ``name``'s parameters back at its mapping; whether it ran from a slot."""
        slot = self._slot_of(name)
        if slot is None or not slot.bound:
            return False
        layout = self._layouts[name]
        for (owner, key), original in zip(layout.parameters, layout.originals):
            owner[key] = original
        slot.bound = slot.claimed = False
        slot.used = next(self._clock)
        return True

    def _slot_of(self, name: str) -> _Slot | None:
        return next((slot for slot in self._slots if slot.holder == name), None)

    def _free_slot(self) -> _Slot | None:
        free = [slot for slot in self._slots if not slot.claimed]
        return min(free, key=lambda slot: slot.used, default=None)

    def _waiting_slot(self) -> _Slot | None:
        """A slot kept for a block still to come: the blocks run in another order than foreseen."""
        waiting = [slot for slot in self._slots if slot.claimed and not slot.bound]
        return min(waiting, key=lambda slot: slot.used, default=None)

    def _claim(self, slot: _Slot, name: str) -> None:
        if slot.holder != name:
            if slot.read is not None and not slot.read.cancel():
                wait([slot.read])  # the reader thread is still writing into the slot
            slot.holder = name
            slot.read = self._executor.submit(self._read, name, slot.memory)
        slot.claimed = True

    def _read(self, name: str, memory: mmap.mmap) -> bool:
        if not self._needs_reading(name):
            return False
        read_runs(self._layouts[name].runs, memoryview(memory))
        return True


def _layout_of(block: ReadBlock, mappings: Sequence[FileMapping]) -> _Layout | None:
    parameters = tuple((owner, key) for owner, key in block.parameters if owner[key].nbytes)
    originals = tuple(owner[key] for owner, key in parameters)
    placed = lay_out(originals, mappings)
    if placed is None or not parameters:
        return None
    runs, offsets = placed
    size_bytes = max(run.slot_offset + run.length_bytes for run in runs)
    return _Layout(runs, parameters, originals, offsets, size_bytes)


def _views_in(slot_bytes: torch.Tensor, layout: _Layout) -> tuple[nn.Parameter, ...]:
    """The block's parameters as views of a slot's bytes, shaped and typed as the originals."""
    return tuple(
        nn.Parameter(
            slot_bytes[offset : offset + original.nbytes].view(original.dtype).view(original.shape),
            requires_grad=original.requires_grad,
        )
        for original, offset in zip(layout.originals, layout.slot_offsets)
    )
