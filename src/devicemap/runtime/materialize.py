"""Put each tensor of a model where its block lives: ``load``, ``dispatch`` and every pipeline rank come here.

The tensors come from a checkpoint (``CheckpointTensors``) or from where a module holds
them now (``ModuleTensors``). Parameters go to their block's device, buffers to where it
computes, each once however many names share it (tied weights). A tensor that already is
what its place needs stays as it is: a view of its checkpoint file at its dtype, on the
CPU or on disk, or a tensor already on its device. Else it is copied to its accelerator
in pieces through one buffer there and converted there, so that it is never there at
both dtypes; read through small buffers, on a thread per core, and converted into memory
for the CPU; or, for disk, converted piece by piece into an offload file of devicemap's
own and mapped back. Host memory holds the CPU-resident weights plus a buffer per
thread; pages mapped only to be copied elsewhere are given back as soon as they are.
"""

import math
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from torch import nn
from transformers import PreTrainedModel

from ..errors import CheckpointError, DeviceMapError
from ..model.profile import names_per_tensor
from ..planning.plan import Placement, Plan
from ..storage.checkpoint import Checkpoint
from ..storage.offload import OffloadFiles
from ..storage.safetensors_file import Produced, TensorSpec
from ..storage.sources import Source, SourceMap
from .dtype_support import require_supported_dtypes
from .paging import unmap_pages


@dataclass(frozen=True)
class BlockTensor:
    """One tensor of a block: where it is attached (``owner[key]``) and whether it is a parameter."""

    name: str
    module: nn.Module
    key: str
    is_parameter: bool

    @property
    def owner(self) -> dict:
        return self.module._parameters if self.is_parameter else self.module._buffers

    @property
    def value(self) -> torch.Tensor:
        return self.owner[self.key]


@dataclass(frozen=True)
class PlacedBlock:
    """A block with its placement, its module and every tensor it holds (tied ones under each name).

    ``kv_window`` is the sliding window the plan reserves the block's cache for (``None``: no window).
    """

    placement: Placement
    module: nn.Module
    tensors: tuple[BlockTensor, ...]
    kv_window: int | None = None

    @property
    def offloaded(self) -> bool:
        return self.placement.device != self.placement.execution_device


def blocks_of(module: nn.Module, plan: Plan) -> list[PlacedBlock]:
    """The plan's blocks in the profile's (execution) order, each with its module and its tensors.

    >>> from devicemap.model.profile import profile_module
    >>> from devicemap.planning.planner import make_plan
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> plan = make_plan(profile_module(model), {"cpu": 2**20})
    >>> [block.placement.block for block in blocks_of(model, plan)]
    ['0', '1']
    """
    modules = dict(module.named_modules(remove_duplicate=False))
    profiled = {block.name: block for block in plan.profile.blocks}
    order = {name: index for index, name in enumerate(profiled)}
    blocks = []
    for placement in sorted(plan.placements, key=lambda placement: order.get(placement.block, len(order))):
        if placement.block not in modules:
            raise DeviceMapError(
                f"the plan places block {placement.block!r}, which {type(module).__name__} does not have; "
                "the plan was made for another model: make it again for this one"
            )
        block = profiled.get(placement.block)
        names = block.tensor_names if block is not None else ()
        tensors = tuple(_find_tensor(modules, name) for name in names)
        window = block.kv_window if block is not None else None
        blocks.append(PlacedBlock(placement, modules[placement.block], tensors, window))
    return blocks


def block_tensors(module: nn.Module, prefix: str) -> tuple[BlockTensor, ...]:
    """Every tensor of ``module`` and its submodules, named under ``prefix`` (tied ones under each name).

    >>> [tensor.name for tensor in block_tensors(nn.Sequential(nn.Linear(2, 2)), "head")]
    ['head.0.weight', 'head.0.bias']
    """
    return tuple(
        BlockTensor(".".join(part for part in (prefix, path, key) if part), owner, key, key in owner._parameters)
        for path, owner in module.named_modules(remove_duplicate=False)
        for key, tensor in (*owner._parameters.items(), *owner._buffers.items())
        if tensor is not None
    )


def _find_tensor(modules: Mapping[str, nn.Module], name: str) -> BlockTensor:
    path, _, key = name.rpartition(".")
    owner = modules.get(path)
    if owner is None or (key not in owner._parameters and key not in owner._buffers):
        raise DeviceMapError(f"the plan names tensor {name!r}, which the model does not have; make the plan again")
    return BlockTensor(name, owner, key, key in owner._parameters)


class CheckpointTensors:
    """The tensors of ``checkpoint`` for ``model`` (built on meta) at load dtype ``dtype``, as transformers makes them.

    A tensor tied to another (an output head sharing the embedding) is read under
    whichever of its names the checkpoint holds. Handles are ``Source``s.
    """

    def __init__(self, checkpoint: Checkpoint, sources: SourceMap, model: nn.Module, dtype: torch.dtype):
        self.checkpoint = checkpoint
        self.sources = sources
        self.model = model
        self.dtypes = _target_dtypes(model, dtype)
        tied = names_per_tensor(model.state_dict(keep_vars=True).items())
        self._names = {name: names for names in tied for name in names}
        self._position = {name: index for index, name in enumerate(checkpoint.tensors)}
        self._buffers = threading.local()

    def find(self, tensor: BlockTensor) -> Source | None:
        names = self._names.get(tensor.name, (tensor.name,))
        return next((self.sources.sources[name] for name in names if name in self.sources.sources), None)

    def position(self, source: Source) -> int:
        """Where the source starts in the checkpoint's files: reading in this order reads each file once, in order."""
        return self._position[source.keys[0]]

    def dtype(self, source: Source) -> torch.dtype:
        return self.dtypes[source.target]

    def shape(self, source: Source) -> tuple[int, ...]:
        return tuple(self.sources.found_shapes[source.target])

    def ready(self, source: Source, device: str) -> bool:
        """Whether the file's own view is the tensor ``device`` keeps: host memory or disk, at the file's dtype."""
        return (
            device in ("cpu", "disk")
            and source.direct
            and self.checkpoint.tensors[source.keys[0]].dtype == self.dtype(source)
        )

    def make(self, source: Source, device: str) -> torch.Tensor:
        """The tensor for ``source`` on ``device`` at its dtype: the file's own view when nothing changes."""
        dtype = self.dtype(source)
        if device == "cpu" and source.direct and not self.ready(source, device):
            converted = torch.empty(self.shape(source), dtype=dtype)
            self.checkpoint.read_into(source.keys[0], converted)
            return converted
        if source.direct and device != "cpu" and self.checkpoint.tensors[source.keys[0]].dtype != dtype:
            tensor = copy_converted(self.checkpoint.tensor(source.keys[0]), device, dtype)
        elif source.direct:
            tensor = self.checkpoint.tensor_to(source.keys[0], device, dtype)
        else:
            tensor = self._fuse(source, device, dtype)
        for key in source.keys:
            view = self.checkpoint.tensor(key)
            if tensor.data_ptr() != view.data_ptr():
                # Read only to be copied: give the pages back so they do not add up in this process.
                unmap_pages(view)
        return tensor

    def pieces(self, source: Source) -> Produced:
        """The tensor for ``source`` on the CPU; a checkpoint tensor taken as it is comes in pieces made one at
        a time in one reused buffer, whatever its size."""
        if not source.direct:
            return self.make(source, "cpu")
        return self._read_in_pieces(source)

    def _read_in_pieces(self, source: Source) -> Iterator[torch.Tensor]:
        dtype = self.dtype(source)
        by_dtype = self._buffers.__dict__.setdefault("by_dtype", {})
        if dtype not in by_dtype:
            by_dtype[dtype] = torch.empty(_PIECE_ELEMENTS, dtype=dtype)
        buffer = by_dtype[dtype]
        total = math.prod(self.shape(source))
        for start in range(0, total, _PIECE_ELEMENTS):
            piece = buffer[: min(_PIECE_ELEMENTS, total - start)]
            self.checkpoint.read_into(source.keys[0], piece, start)
            yield piece

    def _fuse(self, source: Source, device: str, dtype: torch.dtype) -> torch.Tensor:
        """Build a tensor the model keeps fused (e.g. all experts of a layer) from its checkpoint tensors."""
        where = (
            f"{self.checkpoint.folder}: tensor {source.target} is built from {len(source.keys)} checkpoint "
            f"tensors ({source.keys[0]} …)"
        )
        try:
            tensor = source.make(lambda key: self.checkpoint.tensor_to(key, device, dtype), self.model)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(
                f"{where} and they do not fit together: {str(error).splitlines()[0]}; check that config.json "
                "describes these weights and that every file was copied"
            ) from None
        if tuple(tensor.shape) != self.shape(source):
            raise CheckpointError(
                f"{where}, which make shape {list(tensor.shape)} where the model expects {list(self.shape(source))}; "
                "check that config.json describes these weights"
            )
        return tensor


class ModuleTensors:
    """The tensors a module holds now, wherever they are (``dispatch``). Handles are the tensors themselves."""

    def find(self, tensor: BlockTensor) -> torch.Tensor:
        return tensor.value

    def position(self, tensor: torch.Tensor) -> int:
        return 0

    def dtype(self, tensor: torch.Tensor) -> torch.dtype:
        return tensor.dtype

    def shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def ready(self, tensor: torch.Tensor, device: str) -> bool:
        return device != "disk" and tensor.device == torch.device(device)

    def make(self, tensor: torch.Tensor, device: str) -> torch.Tensor:
        return tensor if self.ready(tensor, device) else tensor.detach().to(device)

    def pieces(self, tensor: torch.Tensor) -> Produced:
        return tensor


TensorSource = CheckpointTensors | ModuleTensors


@dataclass(frozen=True)
class _Placing:
    """One tensor to put in place: every name it has in the blocks, the first block holding it, where it goes."""

    tensors: tuple[BlockTensor, ...]
    block: PlacedBlock
    device: str
    handle: object


def materialize(
    blocks: Sequence[PlacedBlock],
    source: TensorSource,
    *,
    offload_folder: str | os.PathLike | None,
    owner: nn.Module,
    progress: bool | None = False,
) -> None:
    """Put every tensor of ``blocks`` that ``source`` has where its block keeps it; see the module docstring.

    Tensors ``source`` lacks stay as they are. Disk blocks that must be written go into a
    folder of devicemap's own inside ``offload_folder`` (default: the system temp folder),
    removed with ``owner``; on failure nothing written is left behind. ``progress`` shows
    a bar per device on stderr (``None``: when stderr is a terminal).

    >>> from devicemap.model.profile import profile_module
    >>> from devicemap.planning.planner import make_plan
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> plan = make_plan(profile_module(model), {"cpu": 2**20, "disk": 2**20}, None, {"0": "cpu", "1": "disk"})
    >>> materialize(blocks_of(model, plan), ModuleTensors(), offload_folder=None, owner=model)
    >>> from devicemap.runtime.paging import file_backed, page_ranges
    >>> file_backed(page_ranges([model[0].weight])), file_backed(page_ranges([model[1].weight]))
    (False, True)
    """
    placing = sorted(_placing(blocks, source), key=lambda item: source.position(item.handle))
    require_supported_dtypes(
        (device, source.dtype(item.handle))
        for item in placing
        for device in (item.device, item.block.placement.execution_device)
    )
    files = OffloadFiles(offload_folder)
    try:
        with _progress_bar(progress) as bar, _loading_threads() as pool:
            totals: dict[str, int] = {}
            for item in placing:
                totals[item.device] = totals.get(item.device, 0) + _bytes(source, item.handle)
            tasks = {device: bar.add_task(device, total=total_bytes) for device, total_bytes in totals.items()}
            try:
                _place(placing, source, files, lambda device, size: bar.advance(tasks[device], size), pool)
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        files.commit(owner)
    except BaseException:
        files.discard()
        raise


def _place(
    placing: list[_Placing], source: TensorSource, files: OffloadFiles, advance: Callable, pool: ThreadPoolExecutor
) -> None:
    """Take what is ready and copy to accelerators here; convert for the host and write for disk on ``pool``."""
    for_disk: dict[str, list[_Placing]] = {}
    on_host, in_this_thread = [], []
    for item in placing:
        if item.tensors[0].is_parameter and item.device == "disk" and not source.ready(item.handle, "disk"):
            for_disk.setdefault(item.block.placement.block, []).append(item)
        elif item.device == "cpu" and not source.ready(item.handle, "cpu"):
            on_host.append(item)
        else:
            # What is ready costs nothing to take, and an accelerator converts faster than the threads.
            in_this_thread.append(item)
    made = [(item, pool.submit(source.make, item.handle, "cpu")) for item in on_host]
    files.expect([_specs(items, source) for items in for_disk.values()])
    written = [
        (items, pool.submit(_write_block, block, items, source, files, advance)) for block, items in for_disk.items()
    ]
    for item in in_this_thread:
        _assign(item.tensors, source.make(item.handle, "cpu" if item.device == "disk" else item.device))
        advance(item.device, _bytes(source, item.handle))
    for item, future in made:
        _assign(item.tensors, future.result())
        advance(item.device, _bytes(source, item.handle))
    for items, future in written:
        mapped = future.result()
        for item in items:
            _assign(item.tensors, mapped[item.tensors[0].name])


def copy_converted(tensor: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(device).to(dtype)`` through one reused buffer on ``device``: only a piece is there twice.

    Copying the whole tensor and converting it there would hold it at both dtypes at once
    (4.2 GB more for a 70B model's float32 embedding loaded as bfloat16); piece by piece,
    ``device`` still converts, and holds the result plus one piece at ``tensor``'s dtype.
    Each piece waits on ``device``'s stream for the previous one's conversion.

    >>> copy_converted(torch.arange(5.0), "cpu", torch.bfloat16)
    tensor([0., 1., 2., 3., 4.], dtype=torch.bfloat16)
    """
    converted = torch.empty(tensor.shape, dtype=dtype, device=device)
    flat, out = tensor.reshape(-1), converted.view(-1)
    buffer = torch.empty(min(flat.numel(), _DEVICE_PIECE_ELEMENTS), dtype=tensor.dtype, device=device)
    for start in range(0, flat.numel(), _DEVICE_PIECE_ELEMENTS):
        piece = buffer[: min(_DEVICE_PIECE_ELEMENTS, flat.numel() - start)]
        piece.copy_(flat[start : start + piece.numel()])
        out[start : start + piece.numel()].copy_(piece)
    return converted


def _placing(blocks: Sequence[PlacedBlock], source: TensorSource) -> Iterator[_Placing]:
    """Each distinct tensor of ``blocks`` that ``source`` has, going where the first block holding it keeps it."""
    where = {tensor.name: (block, tensor) for block in blocks for tensor in block.tensors}
    for names in names_per_tensor((name, tensor.value) for name, (_, tensor) in where.items()):
        block, first = where[names[0]]
        handle = source.find(first)
        if handle is not None:
            device = block.placement.device if first.is_parameter else block.placement.execution_device
            yield _Placing(tuple(where[name][1] for name in names), block, device, handle)


def _write_block(
    block: str, items: list[_Placing], source: TensorSource, files: OffloadFiles, advance: Callable
) -> dict[str, torch.Tensor]:
    """Write a disk block's tensors into an offload file, one at a time, and map them from it."""
    handles = {item.tensors[0].name: item.handle for item in items}
    specs = _specs(items, source)

    def produce(name: str) -> Produced:
        advance("disk", _bytes(source, handles[name]))
        return source.pieces(handles[name])

    return files.write_block(block, specs, produce)


def _specs(items: list[_Placing], source: TensorSource) -> list[TensorSpec]:
    """What a disk block's offload file holds: each tensor's name, dtype and shape at its load dtype."""
    return [(item.tensors[0].name, source.dtype(item.handle), source.shape(item.handle)) for item in items]


def _assign(tensors: tuple[BlockTensor, ...], value: torch.Tensor) -> None:
    """Attach ``value`` under every name of one tensor; a new value becomes a parameter where one was."""
    current = tensors[0].value
    if value is not current:
        if tensors[0].is_parameter:
            value = nn.Parameter(value, requires_grad=current.requires_grad and value.is_floating_point())
        # transformers' initialisation skips tensors marked loaded, and computes the rest.
        value._is_hf_initialized = True
    for tensor in tensors:
        tensor.owner[tensor.key] = value


def _bytes(source: TensorSource, handle) -> int:
    return source.dtype(handle).itemsize * math.prod(source.shape(handle))


# A disk block's tensors are converted and written in pieces of this many elements.
_PIECE_ELEMENTS = 2**18
# A tensor converted on an accelerator crosses to it in pieces of this many elements (4 MiB at
# float32): big enough that a copy's fixed cost is small beside it, small beside any GPU.
_DEVICE_PIECE_ELEMENTS = 2**20
# Reading and converting release the GIL, so threads spread them over the process's cores.
_MAX_LOADING_THREADS = 8


def _loading_threads() -> ThreadPoolExecutor:
    """Threads for reading, converting and writing host tensors; each runs torch ops on itself alone.

    torch splits an elementwise op of 32768 elements or more across its own threads; on
    a busy machine each split waits milliseconds for them (7 ms per tensor measured on 2
    shared cores: 1.8 s to convert SmolLM2-135M, against 0.27 s on one thread).
    ``torch.set_num_threads`` called on a thread sets that thread's count only.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ThreadPoolExecutor(
        min(cores, _MAX_LOADING_THREADS), thread_name_prefix="devicemap-load",
        initializer=torch.set_num_threads, initargs=(1,),
    )  # fmt: skip


def _progress_bar(show: bool | None) -> Progress:
    """A bar per device, in bytes, on stderr; ``None`` shows it when stderr is a terminal."""
    return Progress(
        TextColumn("loading to {task.description:>8}"), BarColumn(), DownloadColumn(binary_units=True),
        TransferSpeedColumn(), console=Console(stderr=True), transient=True,
        disable=not (sys.stderr.isatty() if show is None else show),
    )  # fmt: skip


def _target_dtypes(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Each tensor's dtype once loaded, as transformers decides: float32 where the model keeps it, else as built."""
    keep = model._get_dtype_plan(dtype) if isinstance(model, PreTrainedModel) else {}
    dtypes = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        kept = [kept_dtype for pattern, kept_dtype in keep.items() if _matches(pattern, name)]
        dtypes[name] = kept[0] if kept and tensor.is_floating_point() else tensor.dtype
    return dtypes


def _matches(pattern: str, name: str) -> bool:
    return re.search(pattern.replace("*", ".*"), name) is not None
