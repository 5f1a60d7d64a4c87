"""Run a model placed across devices: hooks at block boundaries, offloaded weights fetched ahead.

Every block of a plan gets one forward pre-hook that moves its inputs to the device it
computes on, when they are elsewhere; outputs stay where they were made, and the
model's output returns to the device of its inputs. Blocks offloaded from where they
compute get their weights ahead of use on one background thread: pages read ahead for
disk blocks computing on the CPU (which compute on the file's mapping in place), slots
on the GPU for blocks streamed there (``streaming``). Blocks of a model with
sliding-window attention also get a hook after them that holds their cache layers to
the window the plan reserved (``sliding``). Nothing is hooked below a block.
"""

import os
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from torch import nn

from ..devices import DeviceLike, loading_budgets
from ..errors import DeviceMapError
from ..model.cache_size import cache_layer_indices
from ..model.profile import profile_module
from ..planning.plan import Placement, Plan
from ..planning.planner import make_plan
from ..storage.offload import OffloadFiles
from .moving import hook_encoder, moved, return_to_input_device
from .paging import HostPager, page_ranges
from .sliding import trim_windows_after
from .streaming import AcceleratorStreamer, StreamedBlock

DEFAULT_PREFETCH_DEPTH = 1


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
    """A block of a plan with its module and every tensor it holds (tied ones under each name)."""

    placement: Placement
    module: nn.Module
    tensors: tuple[BlockTensor, ...]

    @property
    def offloaded(self) -> bool:
        return self.placement.device != self.placement.execution_device


@dataclass
class _Dispatched:
    """What ``dispatch`` attached to a model, so that ``remove_dispatch`` can take it all away."""

    handles: list = field(default_factory=list)
    executor: Executor | None = None
    fetchers: dict = field(default_factory=dict)
    encoder: nn.Module | None = None


def dispatch(
    module: nn.Module,
    device_map: Mapping[str, DeviceLike] | DeviceLike | Plan,
    *,
    offload_folder: str | os.PathLike | None = None,
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
    disk_resident_bytes: int | None = None,
) -> nn.Module:
    """Spread a module that is in memory over devices as ``device_map`` says, and run it there.

    ``device_map`` is a dict of module-name prefixes to devices, one device, or a ``Plan``.
    Blocks mapped to "disk" are written as safetensors into a folder of devicemap's own
    inside ``offload_folder`` (the system temp folder by default) and computed from their
    memory mapping. ``prefetch_depth`` is how many offloaded blocks are fetched ahead;
    ``disk_resident_bytes`` caps the mapped bytes of disk blocks (``None``: no cap, the
    kernel reclaims their clean pages under pressure). Returns ``module``, hooked.

    >>> layers_on_disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
    ...                   "model.rotary_emb": "cpu", "lm_head": "cpu"}
    >>> model = dispatch(model, layers_on_disk, offload_folder="offload")  # doctest: +SKIP
    >>> model.generate(**inputs)  # doctest: +SKIP
    """
    check_prefetch_depth(prefetch_depth)
    remove_dispatch(module)
    plan = device_map
    if not isinstance(plan, Plan):
        plan = make_plan(profile_module(module), loading_budgets(), None, device_map)
    files = OffloadFiles(offload_folder)
    try:
        _place(blocks_of(module, plan), files)
        files.commit(module)
    except BaseException:
        files.discard()
        raise
    module.hf_device_map = plan.device_map
    return attach(module, plan, prefetch_depth=prefetch_depth, disk_resident_bytes=disk_resident_bytes)


def remove_dispatch(module: nn.Module) -> nn.Module:
    """Take away every hook and background thread ``dispatch`` attached; weights stay where they are.

    >>> remove_dispatch(model).forward(**inputs)  # doctest: +SKIP
    """
    state: _Dispatched | None = module.__dict__.pop("_devicemap_dispatch", None)
    if state is None:
        return module
    for handle in state.handles:
        handle.remove()
    for name, fetcher in state.fetchers.items():
        fetcher.unbind(name)
    if state.executor is not None:
        state.executor.shutdown(wait=True)
    if state.encoder is not None:
        state.encoder.__dict__.pop("_hf_hook", None)
    return module


def attach(
    module: nn.Module,
    plan: Plan,
    *,
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
    disk_resident_bytes: int | None = None,
) -> nn.Module:
    """Hook a module whose tensors are already where ``plan`` keeps them (see ``load``).

    Buffers and tensors shared between blocks of a streamed block move to its execution device.

    >>> attach(model, model.devicemap_plan, prefetch_depth=2)  # doctest: +SKIP
    """
    check_prefetch_depth(prefetch_depth)
    blocks = blocks_of(module, plan)
    state = _Dispatched()
    if any(block.offloaded for block in blocks):
        state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devicemap-prefetch")
        state.fetchers = _fetchers(blocks, state.executor, prefetch_depth, disk_resident_bytes)
    fetched = [block.placement.block for block in blocks if block.placement.block in state.fetchers]
    prefetcher = _Prefetcher(fetched, state.fetchers, prefetch_depth)
    for block in blocks:
        state.handles += _hook_block(block, prefetcher if block.placement.block in state.fetchers else None)
    if any(block.kv_window is not None for block in plan.profile.blocks):
        state.handles += _trim_sliding_windows(blocks)
    state.handles.append(module.register_forward_hook(return_to_input_device, with_kwargs=True))
    state.encoder = hook_encoder(module, state.handles)
    module.__dict__["_devicemap_dispatch"] = state
    return module


def check_prefetch_depth(prefetch_depth: int) -> None:
    """Raise a DeviceMapError unless ``prefetch_depth`` is a whole number of blocks, at least 1."""
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise DeviceMapError(f"prefetch_depth {prefetch_depth!r} must be an int of at least 1 (blocks fetched ahead)")


def blocks_of(module: nn.Module, plan: Plan) -> list[PlacedBlock]:
    """The plan's blocks in the profile's (execution) order, each with its module and its tensors.

    >>> [block.placement.block for block in blocks_of(model, plan)][:2]  # doctest: +SKIP
    ['model.embed_tokens', 'model.layers.0']
    """
    modules = dict(module.named_modules(remove_duplicate=False))
    names = {block.name: block.tensor_names for block in plan.profile.blocks}
    order = {name: index for index, name in enumerate(names)}
    blocks = []
    for placement in sorted(plan.placements, key=lambda placement: order.get(placement.block, len(order))):
        if placement.block not in modules:
            raise DeviceMapError(
                f"the plan places block {placement.block!r}, which {type(module).__name__} does not have; "
                "the plan was made for another model: make it again for this one"
            )
        tensors = tuple(_find_tensor(modules, name) for name in names.get(placement.block, ()))
        blocks.append(PlacedBlock(placement, modules[placement.block], tensors))
    return blocks


def _find_tensor(modules: Mapping[str, nn.Module], name: str) -> BlockTensor:
    path, _, key = name.rpartition(".")
    owner = modules.get(path)
    if owner is None or (key not in owner._parameters and key not in owner._buffers):
        raise DeviceMapError(f"the plan names tensor {name!r}, which the model does not have; make the plan again")
    return BlockTensor(name, owner, key, key in owner._parameters)


def _place(blocks: list[PlacedBlock], files: OffloadFiles) -> None:
    """Move every tensor where its block is kept; write disk blocks into ``files`` and map them.

    A tensor reached from several blocks (tied weights) moves once and stays shared:
    ``moved`` maps its id to (the tensor, its new self), holding the original so that its
    id is not reused by another tensor meanwhile.
    """
    moved: dict[int, tuple] = {}
    for block in blocks:
        on_disk = []
        for tensor in block.tensors:
            current = tensor.value
            if id(current) in moved:
                tensor.owner[tensor.key] = moved[id(current)][1]
            elif tensor.is_parameter and block.placement.device == "disk":
                on_disk.append(tensor)
            else:
                target = block.placement.device if tensor.is_parameter else block.placement.execution_device
                moved[id(current)] = (current, _to(current, target))
                tensor.owner[tensor.key] = moved[id(current)][1]
        if on_disk:
            _write_to_disk(block, on_disk, files, moved)


def _write_to_disk(block: PlacedBlock, tensors: list[BlockTensor], files: OffloadFiles, moved: dict) -> None:
    unique = list({id(t.value): t for t in tensors}.values())
    specs = [(t.name, t.value.dtype, tuple(t.value.shape)) for t in unique]
    by_name = {t.name: t.value for t in unique}
    mapped = files.write_block(block.placement.block, specs, by_name.__getitem__)
    for tensor in unique:
        moved[id(tensor.value)] = (tensor.value, _like(tensor.value, mapped[tensor.name]))
    for tensor in tensors:
        tensor.owner[tensor.key] = moved[id(tensor.value)][1]


def _to(tensor: torch.Tensor, device: str) -> torch.Tensor:
    if tensor.device == torch.device(device):
        return tensor
    return _like(tensor, tensor.detach().to(device))


def _like(original: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as a parameter if ``original`` was one, with the same ``requires_grad``."""
    if isinstance(original, nn.Parameter):
        return nn.Parameter(data, requires_grad=original.requires_grad)
    return data


def _fetchers(blocks: list[PlacedBlock], executor: Executor, depth: int, disk_resident_bytes: int | None) -> dict:
    """For each offloaded block with weights to fetch, what fetches them: the host pager, or its GPU's streamer."""
    references = Counter(id(tensor.value) for block in blocks for tensor in block.tensors)
    moved: dict[int, tuple] = {}
    nested = {block.placement.block for block in blocks if _contains_other_blocks(block, blocks)}
    offloaded = [block for block in blocks if block.offloaded]
    ranges = {
        block.placement.block: page_ranges(t.value for t in block.tensors if t.is_parameter)
        for block in offloaded
        if block.placement.execution_device == "cpu"
    }
    ranges = {name: pages for name, pages in ranges.items() if pages}
    pager = HostPager(ranges, executor, disk_resident_bytes)
    fetchers = dict.fromkeys(ranges, pager)
    by_device: dict[str, list[StreamedBlock]] = {}
    for block in offloaded:
        device = block.placement.execution_device
        streamed = _streamed_parameters(block, references, nested, moved) if device != "cpu" else ()
        if streamed:
            pack = block.placement.device == "cpu"
            by_device.setdefault(device, []).append(StreamedBlock(block.placement.block, streamed, pack))
    for device, streamed_blocks in by_device.items():
        _require_cuda(device)
        streamer = AcceleratorStreamer(device, streamed_blocks, depth + 1, executor)
        fetchers.update(dict.fromkeys((block.name for block in streamed_blocks), streamer))
    return fetchers


def _streamed_parameters(
    block: PlacedBlock, references: Counter, nested: set[str], moved: dict[int, tuple]
) -> tuple[tuple[dict, str], ...]:
    """The parameters that travel with ``block``; the rest move to its execution device for good.

    Buffers, tensors reached under several names (tied weights), and the own tensors of a
    block that holds other blocks (which run while it is bound) stay on the execution device.
    ``moved`` maps a moved tensor's id to (the tensor, its copy), so that every name of it
    gets the one copy; holding the original keeps its id from being reused meanwhile.
    """
    device = block.placement.execution_device
    streamed = []
    for tensor in block.tensors:
        current = tensor.value
        if id(current) in moved:
            tensor.owner[tensor.key] = moved[id(current)][1]
        elif tensor.is_parameter and references[id(current)] == 1 and block.placement.block not in nested:
            streamed.append((tensor.owner, tensor.key))
        else:
            moved[id(current)] = (current, _to(current, device))
            tensor.owner[tensor.key] = moved[id(current)][1]
    return tuple(streamed)


def _contains_other_blocks(block: PlacedBlock, blocks: list[PlacedBlock]) -> bool:
    name = block.placement.block
    return any(
        other is not block and (name == "" or other.placement.block.startswith(name + ".")) for other in blocks
    )


def _require_cuda(device: str) -> None:
    if not device.startswith("cuda:"):
        raise DeviceMapError(
            f"offloaded blocks can stream their weights only to CUDA GPUs, and this plan streams some to "
            f"{device}; keep every block on {device}, or compute the offloaded ones on 'cpu'"
        )


class _Prefetcher:
    """Fetches offloaded blocks ahead of use, in the order they last ran.

    The order starts as the plan's, cyclic (after the last offloaded block comes the first
    one of the next step), and then follows what actually runs: modules that run in
    another order than declared, or an encoder that runs once before many decoder steps,
    are fetched right after one pass. ``fetchers`` maps each block to an object with
    ``prepare``, ``fetch_ahead``, ``bind`` and ``unbind`` (``HostPager``, ``AcceleratorStreamer``).
    """

    def __init__(self, order: list[str], fetchers: Mapping[str, object], depth: int):
        self._fetchers = fetchers
        self._depth = depth
        self._next = dict(zip(order, order[1:] + order[:1]))
        self._last: str | None = None

    def before(self, name: str) -> None:
        """Block ``name`` is about to run: have its weights, and start fetching the next ones."""
        if self._last is not None and self._last != name:
            self._next[self._last] = name
        self._last = name
        fetcher = self._fetchers[name]
        fetcher.prepare(name)
        ahead = name
        for _ in range(self._depth):
            ahead = self._next[ahead]
            if ahead == name:
                break
            self._fetchers[ahead].fetch_ahead(ahead)
        fetcher.bind(name)

    def after(self, name: str) -> None:
        """Block ``name`` has run (or failed): let its weights go."""
        self._fetchers[name].unbind(name)


def _hook_block(block: PlacedBlock, prefetcher: _Prefetcher | None) -> list:
    device = torch.device(block.placement.execution_device)
    name = block.placement.block
    non_blocking = device.type != "cpu"

    def move_inputs(module, args, kwargs):
        if prefetcher is not None:
            prefetcher.before(name)
        moved_args = moved(args, device, non_blocking)
        moved_kwargs = moved(kwargs, device, non_blocking)
        if moved_args is args and moved_kwargs is kwargs:
            return None
        return moved_args, moved_kwargs

    handles = [block.module.register_forward_pre_hook(move_inputs, with_kwargs=True)]
    if prefetcher is not None:
        handles.append(block.module.register_forward_hook(lambda *_: prefetcher.after(name), always_call=True))
    return handles


def _trim_sliding_windows(blocks: list[PlacedBlock]) -> list:
    """Hooks that hold each block's sliding-window cache layers to their window (see ``sliding``)."""
    handles = []
    for block in blocks:
        indices = cache_layer_indices(block.module)
        if indices:
            handles.append(block.module.register_forward_hook(trim_windows_after(indices), with_kwargs=True))
    return handles


def is_dispatched(module: nn.Module) -> bool:
    """Whether ``dispatch`` or ``load`` hooked ``module`` (and ``remove_dispatch`` has not since).

    >>> is_dispatched(remove_dispatch(model))  # doctest: +SKIP
    False
    """
    return "_devicemap_dispatch" in module.__dict__

