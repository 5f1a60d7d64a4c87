"""Offloaded blocks computed on a GPU: weights copied in just before use, into reused buffers.

Each streamed block has a fixed slot on its GPU: device memory the size of the largest
streamed block, taken in turn by the blocks in execution order, so that block k+1
copies into one slot while block k computes out of another and nothing is allocated
per call. Copies run on a dedicated stream, ordered by events: a copy into a slot waits
for the compute that last read it, and a block's compute waits for its copy.

A block kept in CPU memory is packed once into pinned host memory laid out as its slot
is, so bringing it in is one asynchronous copy. A block on disk stays a view of its
file; the prefetch thread gathers its pages into a pinned staging buffer, then one
asynchronous copy uploads it. Host memory is pinned by registering plain allocations
with CUDA, which (unlike pinned allocations) are not rounded up to a power of two.

A streamer takes what the plan reserves for streaming: ``STREAM_COPIES`` slots of the
largest streamed block on its GPU (plus up to 255 bytes of alignment per tensor), and
for disk blocks as many pinned staging buffers in CPU memory. A deeper prefetch does
not add slots: two already let block k+1 arrive while block k computes.

Its buffers are ordinary tensors whatever the caller's mode: made inside
``torch.inference_mode()`` they would be inference tensors, which the prefetch thread
(outside inference mode, which is per thread) may not copy into. Before the streamer's
slots and pinned buffers are freed, it waits for the copies still queued or running.
"""

import weakref
from collections.abc import Sequence
from concurrent.futures import Executor, Future, wait
from dataclasses import dataclass

import torch
from torch import nn

from ..planning.ledger import STREAM_COPIES

# Every tensor in a slot starts on this boundary, so vectorised kernels see aligned data.
_ALIGN_BYTES = 256


@dataclass(frozen=True)
class StreamedBlock:
    """A block whose parameters ``(owner, name)`` live off the GPU: ``owner`` is a module's ``_parameters``.

    ``pack`` is True when they are in CPU memory (packed into pinned memory once), False
    when they are views of a file (staged through pinned memory at each fetch).
    """

    name: str
    parameters: tuple[tuple[dict, str], ...]
    pack: bool


@dataclass(frozen=True)
class SlotLayout:
    """The memory one streamer takes: ``count`` slots of ``slot_bytes`` on its GPU, each with
    ``staging_bytes`` of pinned host memory (0 when no streamed block is on disk)."""

    count: int
    slot_bytes: int
    staging_bytes: int


def slot_layout(blocks: Sequence[StreamedBlock], slot_count: int) -> SlotLayout:
    """The slots for ``blocks``: ``slot_count`` of them, but no more than the plan reserves or than blocks.

    >>> layer = {"weight": torch.empty(1000)}
    >>> slot_layout([StreamedBlock("layer", ((layer, "weight"),), pack=True)] * 3, slot_count=4)
    SlotLayout(count=2, slot_bytes=4000, staging_bytes=0)
    """
    slot_bytes = max((_block_bytes(block) for block in blocks), default=0)
    staging_bytes = slot_bytes if any(not block.pack for block in blocks) else 0
    return SlotLayout(min(slot_count, STREAM_COPIES, len(blocks)), slot_bytes, staging_bytes)


def _block_bytes(block: StreamedBlock) -> int:
    return aligned_offsets([owner[key] for owner, key in block.parameters])[1]


def aligned_offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Byte offsets of ``tensors`` laid out one after another on ``_ALIGN_BYTES`` boundaries, and the total.

    >>> aligned_offsets([torch.empty(3, dtype=torch.bfloat16), torch.empty(10)])
    ([0, 256], 296)
    """
    offsets, end = [], 0
    for tensor in tensors:
        start = end + (-end % _ALIGN_BYTES)
        offsets.append(start)
        end = start + tensor.nbytes
    return offsets, end


class PinnedHostBuffer:
    """Plain host memory registered with CUDA, so copies from it to a GPU run asynchronously."""

    def __init__(self, size_bytes: int):
        self.tensor = _host_bytes(size_bytes)
        pointer = self.tensor.data_ptr()
        # cudaHostRegisterPortable: pinned for every GPU's context, not only the current one.
        error = int(torch.cuda.cudart().cudaHostRegister(pointer, self.tensor.nbytes, 1))
        if error != 0:
            raise RuntimeError(f"CUDA could not pin {self.tensor.nbytes} bytes of host memory (cudaError {error})")
        # Unregistered before the memory goes: the finalizer runs before this object's tensor is dropped.
        weakref.finalize(self, _unregister, pointer)


def _host_bytes(size_bytes: int) -> torch.Tensor:
    """Plain CPU memory that any thread may write, whatever the caller's inference mode or default device."""
    with torch.inference_mode(False):
        return torch.empty(max(size_bytes, 1), dtype=torch.uint8, device="cpu")


def _unregister(pointer: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(pointer)


class _Slot:
    """Device memory for one block at a time, its staging buffer, and the events ordering its use."""

    def __init__(self, device: torch.device, size_bytes: int, staging_bytes: int):
        self.buffer = torch.empty(max(size_bytes, 1), dtype=torch.uint8, device=device)
        self.pinned = PinnedHostBuffer(staging_bytes) if staging_bytes else None
        self.staging = self.pinned.tensor if self.pinned is not None else None
        self.loaded = torch.cuda.Event()  # the copy into the slot is done
        self.released = torch.cuda.Event()  # the compute reading the slot is done
        self.staged = torch.cuda.Event()  # the upload out of the staging buffer is done
        self.holder: str | None = None  # the block whose weights are in, or coming into, the slot
        self.claimed_by: str | None = None  # the block that must run before the slot is reused
        self.copy: Future | None = None


@dataclass(frozen=True)
class _Route:
    """How one block reaches its slot: the copies to make, and the parameters to swap."""

    slot: _Slot
    size_bytes: int
    packed: torch.Tensor | None  # pinned host bytes laid out as in the slot
    staged: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (staging bytes, file-backed bytes)
    on_device: tuple[tuple[dict, str, nn.Parameter], ...]
    on_host: tuple[tuple[dict, str, nn.Parameter], ...]


class AcceleratorStreamer:
    """Streams the weights of offloaded blocks to one CUDA device through reused slots.

    ``slot_count`` slots are asked for and at most ``STREAM_COPIES`` are made (see
    ``slot_layout``). The main thread calls ``prepare``, ``bind`` and ``unbind`` around a
    block's forward and ``fetch_ahead`` for blocks to come; copies run on ``executor``'s thread.
    """

    def __init__(self, device: str, blocks: Sequence[StreamedBlock], slot_count: int, executor: Executor):
        self.device = torch.device(device)
        self._executor = executor
        self._copy_stream = torch.cuda.Stream(self.device)
        self._keep: list[PinnedHostBuffer] = []
        layout = slot_layout(blocks, slot_count)
        with torch.inference_mode(False):
            slots = [_Slot(self.device, layout.slot_bytes, layout.staging_bytes) for _ in range(layout.count)]
            self._routes = {
                block.name: self._route(block, slots[index % len(slots)]) for index, block in enumerate(blocks)
            }
        self.staging_bytes = sum(slot.staging.nbytes for slot in slots if slot.staging is not None)
        weakref.finalize(self, _finish_copies, self._copy_stream, slots, self._keep)

    def prepare(self, name: str) -> None:
        """Make sure block ``name``'s copy is under way; the block runs next."""
        route = self._routes[name]
        slot = route.slot
        if slot.claimed_by not in (None, name):
            # The blocks ran in another order than foreseen: the slot was given to a block still
            # to come. Let its copy finish; that block copies again when its turn comes.
            slot.copy.result()
            slot.claimed_by = slot.holder = None
        if slot.holder != name:
            self._start_copy(name, route)
        slot.claimed_by = name

    def fetch_ahead(self, name: str) -> None:
        """Start copying block ``name`` if its slot is free; otherwise it copies when it runs."""
        route = self._routes[name]
        if route.slot.claimed_by is not None:
            return
        if route.slot.holder != name:
            self._start_copy(name, route)
        route.slot.claimed_by = name

    def bind(self, name: str) -> None:
        """Point block ``name``'s parameters at its slot once the copy is done (on the compute stream)."""
        route = self._routes[name]
        if route.slot.copy is not None:
            route.slot.copy.result()  # raises here whatever went wrong on the copy thread
        torch.cuda.current_stream(self.device).wait_event(route.slot.loaded)
        for owner, key, parameter in route.on_device:
            owner[key] = parameter

    def unbind(self, name: str) -> None:
        """Point block ``name``'s parameters back at host memory; the slot is free once its compute is."""
        route = self._routes[name]
        for owner, key, parameter in route.on_host:
            owner[key] = parameter
        route.slot.released.record(torch.cuda.current_stream(self.device))
        route.slot.claimed_by = None

    def _start_copy(self, name: str, route: _Route) -> None:
        route.slot.holder = name
        route.slot.copy = self._executor.submit(self._copy, route)

    def _copy(self, route: _Route) -> None:
        slot = route.slot
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(slot.released)
            source = route.packed
            if source is None:
                # The staging buffer is still being uploaded from until its last copy is done.
                slot.staged.synchronize()
                for staging, file_bytes in route.staged:
                    staging.copy_(file_bytes)
                source = slot.staging[: route.size_bytes]
            slot.buffer[: route.size_bytes].copy_(source, non_blocking=True)
            if route.packed is None:
                slot.staged.record(self._copy_stream)
            slot.loaded.record(self._copy_stream)

    def _route(self, block: StreamedBlock, slot: _Slot) -> _Route:
        offsets, size_bytes = aligned_offsets([owner[key] for owner, key in block.parameters])
        packed = self._pack(block, offsets, size_bytes) if block.pack else None
        hosts = [owner[key] for owner, key in block.parameters]
        staged = () if block.pack else tuple(
            (slot.staging[offset : offset + host.nbytes], _bytes_of(host))
            for host, offset in zip(hosts, offsets)
            if host.nbytes
        )
        on_device = tuple(
            (owner, key, _parameter_view(slot.buffer, offset, host))
            for (owner, key), host, offset in zip(block.parameters, hosts, offsets)
        )
        on_host = tuple((owner, key, host) for (owner, key), host in zip(block.parameters, hosts))
        return _Route(slot, size_bytes, packed, staged, on_device, on_host)

    def _pack(self, block: StreamedBlock, offsets: list[int], size_bytes: int) -> torch.Tensor:
        """Copy a CPU block into one pinned buffer laid out as its slot; the copies replace the originals."""
        buffer = PinnedHostBuffer(size_bytes)
        self._keep.append(buffer)
        _pack_into(buffer.tensor, block.parameters, offsets)
        return buffer.tensor[:size_bytes]


def _pack_into(buffer: torch.Tensor, parameters: Sequence[tuple[dict, str]], offsets: Sequence[int]) -> None:
    """Copy each parameter ``owner[key]`` into ``buffer`` at its offset, and put the copy in its place.

    One parameter at a time, keeping no other reference to it: each original is freed
    (unless something else holds it) as soon as its copy replaces it, so packing a model's
    CPU blocks never holds them twice.
    """
    for (owner, key), offset in zip(parameters, offsets):
        copy = _parameter_view(buffer, offset, owner[key])
        copy.data.copy_(owner[key])
        owner[key] = copy


def _finish_copies(copy_stream: torch.cuda.Stream, slots: list[_Slot], pinned: list[PinnedHostBuffer]) -> None:
    """Wait until no copy writes into ``slots`` or reads from pinned memory; run as the streamer goes.

    The copy thread only queues copies on the copy stream: were a slot freed meanwhile,
    the caching allocator could hand its memory to a tensor of the compute stream while
    the copy still writes into it, and an unregistered pinned buffer could be reused
    while the copy still reads it. ``pinned`` (the packed blocks' host buffers) is only
    held here, so that it is freed after the copies, whatever order the garbage
    collector takes the streamer's parts in.
    """
    _wait_for([slot.copy for slot in slots])
    copy_stream.synchronize()


def _wait_for(copies: Sequence[Future | None]) -> None:
    """Wait for every copy queued or running on the copy thread; their errors concern no one now."""
    wait([copy for copy in copies if copy is not None])


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.uint8)


def _parameter_view(buffer: torch.Tensor, offset: int, like: torch.Tensor) -> nn.Parameter:
    """A parameter shaped like ``like`` over ``buffer``'s bytes from ``offset``."""
    data = buffer[offset : offset + like.nbytes].view(like.dtype).view(like.shape)
    return nn.Parameter(data, requires_grad=False)
