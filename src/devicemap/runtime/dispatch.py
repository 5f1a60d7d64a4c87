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
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..devices import DeviceLike, loading_budgets, normalize_device, runtime_reserves
from ..errors import DeviceMapError
from ..model.cache_size import cache_layer_indices
from ..model.profile import names_per_tensor, profile_module
from ..planning.plan import Plan
from ..planning.planner import make_plan
from .materialize import ModuleTensors, PlacedBlock, blocks_of, materialize
from .moving import hook_encoder, moved, return_to_input_device
from .paging import HostPager, page_ranges
from .sliding import trim_windows_after
from .streaming import AcceleratorStreamer, StreamedBlock

DEFAULT_PREFETCH_DEPTH = 1


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
    kernel reclaims their clean pages under pressure). A model whose ``generate`` prefills
    in chunks gets the plan's chunk as its ``generation_config.prefill_chunk_size``.
    Returns ``module``, hooked.

    >>> model = dispatch(nn.Sequential(nn.Linear(2, 4), nn.Linear(4, 2)), {"0": "cpu", "1": "disk"})
    >>> model(torch.ones(1, 2)).shape
    torch.Size([1, 2])
    """
    check_prefetch_depth(prefetch_depth)
    remove_dispatch(module)
    plan = device_map
    if not isinstance(plan, Plan):
        budgets = with_held_bytes(loading_budgets(), held_bytes(module))
        plan = make_plan(profile_module(module), budgets, None, device_map, True, runtime_reserves(budgets))
    blocks = blocks_of(module, plan)
    materialize(blocks, ModuleTensors(), offload_folder=offload_folder, owner=module)
    module.hf_device_map = plan.device_map
    set_prefill_chunk(module, plan)
    return attach(module, blocks, prefetch_depth=prefetch_depth, disk_resident_bytes=disk_resident_bytes)


def set_prefill_chunk(module: nn.Module, plan: Plan) -> None:
    """Have ``generate`` prefill in the chunks the plan reserved activations for; nothing if it planned whole prompts.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from devicemap.workload import Workload
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=64, intermediate_size=256, num_hidden_layers=1,
    ...                                      num_attention_heads=2))
    >>> set_prefill_chunk(model, make_plan(profile_module(model), {"cpu": 2**30}, Workload(1, 4096, prefill_chunk=64)))
    >>> model.generation_config.prefill_chunk_size
    64
    """
    if plan.prefill_chunk is not None:
        module.generation_config.prefill_chunk_size = plan.prefill_chunk


def held_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of ``module``'s parameters and buffers on each device, each tensor once however many names it has.

    >>> held_bytes(nn.Linear(2, 3))
    {'cpu': 36}
    """
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    held: dict[str, int] = {}
    for names in names_per_tensor(named.items()):
        tensor = named[names[0]]
        if not tensor.is_meta:
            device = normalize_device(tensor.device)
            held[device] = held.get(device, 0) + tensor.nbytes
    return held


def with_held_bytes(budgets: Mapping[str, int], held: Mapping[str, int]) -> dict[str, int]:
    """``budgets`` measured as free now, plus what the module to plan already ``held`` there.

    Free memory does not count the module's own weights as room, yet where they stay they
    need none, and where they leave they give theirs back.

    >>> with_held_bytes({"cuda:0": 100, "cpu": 1000}, {"cuda:0": 60, "meta": 8})
    {'cuda:0': 160, 'cpu': 1000}
    """
    return {device: size + held.get(device, 0) for device, size in budgets.items()}


def remove_dispatch(module: nn.Module) -> nn.Module:
    """Take away every hook and background thread ``dispatch`` attached; weights stay where they are.

    >>> model = dispatch(nn.Linear(2, 2), "cpu")
    >>> is_dispatched(remove_dispatch(model))
    False
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
    blocks: list[PlacedBlock],
    *,
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
    disk_resident_bytes: int | None = None,
) -> nn.Module:
    """Hook a module whose tensors are already where ``blocks`` keep them (see ``materialize``).

    Buffers and tensors shared between blocks of a streamed block move to its execution device.

    >>> from devicemap.model.profile import profile_module
    >>> from devicemap.planning.planner import make_plan
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    >>> blocks = blocks_of(model, make_plan(profile_module(model), {"cpu": 2**20}))
    >>> attach(model, blocks, prefetch_depth=2)(torch.ones(1, 2)).shape
    torch.Size([1, 2])
    """
    check_prefetch_depth(prefetch_depth)
    state = _Dispatched()
    if any(block.offloaded for block in blocks):
        state.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="devicemap-prefetch")
        state.fetchers = _fetchers(module, blocks, state.executor, prefetch_depth, disk_resident_bytes)
    fetched = [block.placement.block for block in blocks if block.placement.block in state.fetchers]
    prefetcher = _Prefetcher(fetched, state.fetchers, prefetch_depth)
    for block in blocks:
        state.handles += _hook_block(block, prefetcher if block.placement.block in state.fetchers else None)
    if any(block.kv_window is not None for block in blocks):
        state.handles += _trim_sliding_windows(blocks)
    state.handles.append(module.register_forward_hook(return_to_input_device, with_kwargs=True))
    state.encoder = hook_encoder(module, state.handles)
    module.__dict__["_devicemap_dispatch"] = state
    return module


def staging_bytes(module: nn.Module) -> int:
    """Bytes of pinned host memory the GPUs streaming ``module``'s disk blocks stage them through.

    >>> staging_bytes(dispatch(nn.Linear(2, 2), {"": "cpu"}))
    0
    """
    state: _Dispatched | None = module.__dict__.get("_devicemap_dispatch")
    fetchers = state.fetchers.values() if state is not None else ()
    streamers = {id(fetcher): fetcher for fetcher in fetchers if isinstance(fetcher, AcceleratorStreamer)}
    return sum(streamer.staging_bytes for streamer in streamers.values())


def check_prefetch_depth(prefetch_depth: int) -> None:
    """Raise a DeviceMapError unless ``prefetch_depth`` is a whole number of blocks, at least 1."""
    if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
        raise DeviceMapError(f"prefetch_depth {prefetch_depth!r} must be an int of at least 1 (blocks fetched ahead)")


def _fetchers(
    module: nn.Module, blocks: list[PlacedBlock], executor: Executor, depth: int, disk_resident_bytes: int | None
) -> dict:
    """For each offloaded block with weights to fetch, what fetches them: the host pager, or its GPU's streamer."""
    offloaded = [block for block in blocks if block.offloaded]
    ranges = {
        block.placement.block: page_ranges(t.value for t in block.tensors if t.is_parameter)
        for block in offloaded
        if block.placement.execution_device == "cpu"
    }
    ranges = {name: pages for name, pages in ranges.items() if pages}
    pager = HostPager(ranges, executor, disk_resident_bytes)
    fetchers = dict.fromkeys(ranges, pager)
    to_gpus = [block for block in offloaded if block.placement.execution_device != "cpu"]
    by_device: dict[str, list[StreamedBlock]] = {}
    for block, streamed in zip(to_gpus, _streamed_parameters(module, blocks, to_gpus), strict=True):
        if streamed:
            pack = block.placement.device == "cpu"
            by_device.setdefault(block.placement.execution_device, []).append(
                StreamedBlock(block.placement.block, streamed, pack)
            )
    for device, streamed_blocks in by_device.items():
        _require_cuda(device)
        streamer = AcceleratorStreamer(device, streamed_blocks, depth + 1, executor)
        fetchers.update(dict.fromkeys((block.name for block in streamed_blocks), streamer))
    return fetchers


def _streamed_parameters(
    module: nn.Module, blocks: list[PlacedBlock], to_gpus: list[PlacedBlock]
) -> list[tuple[tuple[dict, str], ...]]:
    """For each block of ``to_gpus``, the parameters that travel with it; the rest move to its GPU for good.

    Buffers, tensors reached under several names (tied weights), and the own tensors of a
    block that holds other blocks (which run while it is bound) stay on the execution device.
    """
    named = ((tensor.name, tensor.value) for block in blocks for tensor in block.tensors)
    shared = {name for names in names_per_tensor(named) if len(names) > 1 for name in names}
    streamed, staying = [], []
    for block in to_gpus:
        travels = not _contains_other_blocks(block, blocks)
        own = [t for t in block.tensors if travels and t.is_parameter and t.name not in shared]
        streamed.append(tuple((tensor.owner, tensor.key) for tensor in own))
        device = block.placement.execution_device
        kept = tuple(tensor for tensor in block.tensors if tensor not in own)
        staying.append(replace(block, placement=replace(block.placement, device=device), tensors=kept))
    materialize(staying, ModuleTensors(), offload_folder=None, owner=module)
    return streamed


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

    >>> is_dispatched(dispatch(nn.Linear(2, 2), "cpu"))
    True
    """
    return "_devicemap_dispatch" in module.__dict__

