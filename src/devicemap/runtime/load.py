"""Load a model folder straight onto the devices a plan gives, then hook it to run there.

The model is built on the meta device; each checkpoint tensor is then put where its
block lives, at the load dtype: copied from its file's memory mapping to its
accelerator; kept as a view of that mapping on the CPU or on disk when the dtype
already matches (no copy, nothing written); else read through small buffers, on a
thread per core, and converted into memory for the CPU or, piece by piece, into
devicemap's own offload folder for disk. Host memory holds the CPU-resident weights
plus a buffer per thread; pages mapped only to be copied elsewhere are given back as
soon as they are.
"""

import functools
import math
import os
import re
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from torch import nn
from transformers import GenerationConfig, PreTrainedModel

from ..devices import DeviceLike, check_devices_exist, loading_budgets
from ..errors import CheckpointError
from ..model.profile import profile_module
from ..model.skeleton import build_on_meta, config_dtype, load_config
from ..planning.plan import Plan
from ..planning.planner import make_plan
from ..storage.checkpoint import Checkpoint, open_checkpoint
from ..storage.keys import check_keys
from ..storage.offload import OffloadFiles
from ..storage.sources import Source, SourceMap, map_sources
from ..workload import Workload, dtype_name
from .dispatch import DEFAULT_PREFETCH_DEPTH, BlockTensor, PlacedBlock, attach, blocks_of, check_prefetch_depth
from .paging import unmap_pages


def _frees_on_failure(function):
    """A failed call's frames hold what it built (a half-loaded model); clear them as the error leaves.

    Otherwise that memory stays held for as long as the caller keeps the exception.
    """

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BaseException as error:
            traceback.clear_frames(error.__traceback__)
            raise

    return call


@_frees_on_failure
def load(
    model: str | os.PathLike,
    device_map: str | DeviceLike | Mapping[str, DeviceLike] | Plan = "auto",
    max_memory: Mapping[DeviceLike, int | str] | str | None = None,
    dtype: torch.dtype | str | None = None,
    workload: Workload | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool | None = None,
    *,
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
    disk_resident_bytes: int | None = None,
) -> PreTrainedModel:
    """Load the model folder ``model`` across devices as ``device_map`` says, ready for ``generate``.

    ``device_map`` is "auto", "balanced", "balanced_low_0", "sequential", a dict of
    module-name prefixes to devices, one device, or a ``Plan``; ``max_memory`` sets
    budgets (default: what is free now). ``dtype`` ``None`` keeps the checkpoint's.
    Weights converted for disk go into a folder of devicemap's own inside
    ``offload_folder`` (default: the system temp folder). ``progress`` shows a progress
    bar (``None``: when stderr is a terminal). The model gets ``hf_device_map`` and
    ``devicemap_plan``; ``prefetch_depth`` and ``disk_resident_bytes`` are as for ``dispatch``.

    >>> model = devicemap.load("SmolLM2-135M-Instruct", max_memory={"cpu": "150MB"})  # doctest: +SKIP
    >>> inputs = tokenizer("What is machine learning?", return_tensors="pt")  # doctest: +SKIP
    >>> model.generate(**inputs, max_new_tokens=50)  # doctest: +SKIP
    tensor([[...]])
    """
    check_prefetch_depth(prefetch_depth)
    checkpoint = open_checkpoint(Path(model), allow_pickle=allow_pickle)
    config = load_config(checkpoint.folder, trust_remote_code)
    load_dtype = _load_dtype(dtype, config, checkpoint)
    built = build_on_meta(config, load_dtype, trust_remote_code)
    sources = map_sources(built, checkpoint.shapes)
    check_keys(sources.found_shapes, built, source=str(checkpoint.folder))
    plan = _plan(built, device_map, load_dtype, max_memory, workload, offload, offload_folder)
    blocks = blocks_of(built, plan)
    files = OffloadFiles(offload_folder)
    try:
        with _progress_bar(progress) as bar:
            _Materializer(built, checkpoint, sources, load_dtype, files, bar).run(blocks)
        _finish_tensors(built, blocks, sources)
        files.commit(built)
    except BaseException:
        files.discard()
        raise
    built.eval()
    built.hf_device_map = plan.device_map
    built.devicemap_plan = plan
    if (checkpoint.folder / "generation_config.json").is_file() and built.can_generate():
        built.generation_config = GenerationConfig.from_pretrained(checkpoint.folder)
    return attach(built, plan, prefetch_depth=prefetch_depth, disk_resident_bytes=disk_resident_bytes)


def _load_dtype(dtype, config, checkpoint: Checkpoint) -> torch.dtype:
    """The requested dtype; else the config's, as transformers' ``dtype="auto"``; else the checkpoint's."""
    if dtype is not None:
        return getattr(torch, dtype_name(dtype))
    if getattr(config, "dtype", None) is not None or getattr(config, "torch_dtype", None) is not None:
        return config_dtype(config)
    floating = [info.dtype for info in checkpoint.tensors.values() if info.dtype.is_floating_point]
    return floating[0] if floating else torch.float32


def _plan(model, device_map, dtype, max_memory, workload, offload, offload_folder) -> Plan:
    if isinstance(device_map, Plan):
        check_devices_exist({d for p in device_map.placements for d in (p.device, p.execution_device)})
        return device_map
    budgets = loading_budgets(max_memory, offload_folder)
    return make_plan(profile_module(model, dtype), budgets, workload, device_map, offload)


class _Materializer:
    """Puts every tensor the checkpoint provides where its block lives, in the checkpoint's file order."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, sources: SourceMap, dtype, files, bar):
        self.model = model
        self.checkpoint = checkpoint
        self.sources = sources
        self.files = files
        self.bar = bar
        self.dtypes = _target_dtypes(model, dtype)
        self._buffers = threading.local()

    def run(self, blocks: list[PlacedBlock]) -> None:
        where = {tensor.name: (block, tensor) for block in blocks for tensor in block.tensors}
        unplaced = sorted(set(self.sources.sources) - where.keys())
        if unplaced:
            raise CheckpointError(
                f"the plan places no block holding {', '.join(unplaced[:5])}; it was made for another model "
                "or another version of it: make the plan again from this folder"
            )
        totals: dict[str, int] = {}
        for name in self.sources.sources:
            block, tensor = where[name]
            device = block.placement.device if tensor.is_parameter else block.placement.execution_device
            totals[device] = totals.get(device, 0) + self._bytes(name)
        self.bar.expect(totals)
        for_disk: dict[str, list[tuple[BlockTensor, Source]]] = {}
        on_host: list[tuple[BlockTensor, Source, str]] = []
        in_this_thread: list[tuple[BlockTensor, Source, str]] = []
        for source in self._in_file_order():
            block, tensor = where[source.target]
            if tensor.is_parameter and block.placement.device == "disk" and not self._maps_as_is(source):
                for_disk.setdefault(block.placement.block, []).append((tensor, source))
                continue
            device = block.placement.device if tensor.is_parameter else block.placement.execution_device
            # Views of the file cost nothing to make; the threads make what takes reading and converting.
            at_home = device in ("cpu", "disk") and not self._maps_as_is(source)
            (on_host if at_home else in_this_thread).append((tensor, source, device))
        with _loading_threads() as pool:
            try:
                made = [(tensor, device, pool.submit(self._make, source, "cpu")) for tensor, source, device in on_host]
                written = [(pending, pool.submit(self._write_block, name, pending))
                           for name, pending in for_disk.items()]
                for tensor, source, device in in_this_thread:
                    self._assign(tensor, self._make(source, "cpu" if device == "disk" else device))
                    self.bar.advance(device, self._bytes(source.target))
                for tensor, device, future in made:
                    self._assign(tensor, future.result())
                    self.bar.advance(device, self._bytes(tensor.name))
                for pending, future in written:
                    mapped = future.result()
                    for tensor, _ in pending:
                        self._assign(tensor, mapped[tensor.name])
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise

    def _in_file_order(self) -> list[Source]:
        position = {name: index for index, name in enumerate(self.checkpoint.tensors)}
        return sorted(self.sources.sources.values(), key=lambda source: position[source.keys[0]])

    def _maps_as_is(self, source: Source) -> bool:
        return source.direct and self.checkpoint.tensors[source.keys[0]].dtype == self.dtypes[source.target]

    def _make(self, source: Source, device: str) -> torch.Tensor:
        """The tensor for ``source`` on ``device`` at its dtype: the file's own view when nothing changes."""
        dtype = self.dtypes[source.target]
        if device == "cpu" and source.direct and not self._maps_as_is(source):
            converted = torch.empty(self.sources.found_shapes[source.target], dtype=dtype)
            self.checkpoint.read_into(source.keys[0], converted)
            return converted
        tensor = self.checkpoint.tensor(source.keys[0]) if source.direct else self._fuse(source)
        if device != "cpu":
            tensor = tensor.to(device).to(dtype)  # the accelerator converts faster than the host
        elif tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        for key in source.keys:
            view = self.checkpoint.tensor(key)
            if tensor.data_ptr() != view.data_ptr():
                # Read only to be copied: give the pages back so they do not add up in this process.
                unmap_pages(view)
        return tensor

    def _fuse(self, source: Source) -> torch.Tensor:
        """Build a tensor the model keeps fused (e.g. all experts of a layer) from its checkpoint tensors."""
        where = (
            f"{self.checkpoint.folder}: tensor {source.target} is built from {len(source.keys)} checkpoint "
            f"tensors ({source.keys[0]} …)"
        )
        try:
            tensor = source.make(self.checkpoint.tensor, self.model)
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(
                f"{where} and they do not fit together: {str(error).splitlines()[0]}; check that config.json "
                "describes these weights and that every file was copied"
            ) from None
        expected = tuple(self.sources.found_shapes[source.target])
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{where}, which make shape {list(tensor.shape)} where the model expects {list(expected)}; "
                "check that config.json describes these weights"
            )
        return tensor

    def _write_block(self, block_name: str, pending: list[tuple[BlockTensor, Source]]) -> dict[str, torch.Tensor]:
        """Convert a disk block's tensors into an offload file, piece by piece, and map them from it."""
        by_name = {tensor.name: source for tensor, source in pending}
        specs = [(name, self.dtypes[name], tuple(self.sources.found_shapes[name])) for name in by_name]

        def produce(name: str) -> torch.Tensor | Iterator[torch.Tensor]:
            self.bar.advance("disk", self._bytes(name))
            source = by_name[name]
            return self._pieces(source) if source.direct else self._make(source, "cpu")

        return self.files.write_block(block_name, specs, produce)

    def _pieces(self, source: Source) -> Iterator[torch.Tensor]:
        """Checkpoint tensor ``source`` at its load dtype, in pieces made one at a time in one reused buffer."""
        dtype = self.dtypes[source.target]
        by_dtype = self._buffers.__dict__.setdefault("by_dtype", {})
        if dtype not in by_dtype:
            by_dtype[dtype] = torch.empty(_PIECE_ELEMENTS, dtype=dtype)
        buffer = by_dtype[dtype]
        total = math.prod(self.sources.found_shapes[source.target])
        for start in range(0, total, _PIECE_ELEMENTS):
            piece = buffer[: min(_PIECE_ELEMENTS, total - start)]
            self.checkpoint.read_into(source.keys[0], piece, start)
            yield piece

    def _assign(self, tensor: BlockTensor, value: torch.Tensor) -> None:
        meta = tensor.value
        if tensor.is_parameter:
            value = nn.Parameter(value, requires_grad=meta.requires_grad and value.is_floating_point())
        # transformers' initialisation skips tensors marked loaded, and computes the rest.
        value._is_hf_initialized = True
        tensor.owner[tensor.key] = value

    def _bytes(self, name: str) -> int:
        shape = self.sources.found_shapes[name]
        return self.dtypes[name].itemsize * int(torch.Size(shape).numel())


# A disk block's tensors are converted and written in pieces of this many elements.
_PIECE_ELEMENTS = 2**18
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


def _finish_tensors(model: nn.Module, blocks: list[PlacedBlock], sources: SourceMap) -> None:
    """Tie shared weights, then make what the checkpoint lacks (non-persistent buffers) where it computes."""
    if isinstance(model, PreTrainedModel):
        missing = set(model.state_dict(keep_vars=True)) - set(sources.sources)
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
    made = False
    for block in blocks:
        for tensor in block.tensors:
            if tensor.value.is_meta:
                empty = torch.empty_like(tensor.value, device=block.placement.execution_device)
                tensor.owner[tensor.key] = nn.Parameter(empty, requires_grad=False) if tensor.is_parameter else empty
                made = True
    if made and isinstance(model, PreTrainedModel):
        model.initialize_weights()


class _NoBar:
    def expect(self, totals: Mapping[str, int]) -> None:
        pass

    def advance(self, device: str, size_bytes: int) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass


class _Bar(_NoBar):
    """A rich progress bar per device, in bytes, on stderr."""

    def __init__(self):
        self._progress = Progress(
            TextColumn("loading to {task.description:>8}"), BarColumn(), DownloadColumn(binary_units=True),
            TransferSpeedColumn(), console=Console(stderr=True), transient=True,
        )  # fmt: skip
        self._tasks: dict[str, int] = {}

    def expect(self, totals: Mapping[str, int]) -> None:
        for device, total_bytes in totals.items():
            self._tasks[device] = self._progress.add_task(device, total=total_bytes)

    def advance(self, device: str, size_bytes: int) -> None:
        self._progress.advance(self._tasks[device], size_bytes)

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._progress.stop()


def _progress_bar(progress: bool | None) -> _NoBar:
    show = sys.stderr.isatty() if progress is None else progress
    return _Bar() if show else _NoBar()
