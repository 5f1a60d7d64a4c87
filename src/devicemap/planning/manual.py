"""Manual device maps: module-name prefixes to devices, checked against the model and the budgets."""

import difflib
import warnings
from collections.abc import Mapping

from ..devices import device_order, is_accelerator, normalize_device
from ..errors import DeviceMapError, DeviceNotFoundError
from ..model.profile import Profile
from ..units import first_of, format_size
from ..workload import Workload
from .ledger import DeviceLoad, assign, price_units
from .plan import Placement

_LISTED = 8


def plan_manual(
    profile: Profile, budgets: Mapping[str, int], runtime_reserves: Mapping[str, int], workload: Workload,
    device_map: Mapping,
) -> tuple[list[Placement], list[str]]:  # fmt: skip
    """Placements for a manual map; the longest matching prefix of each tensor's name wins.

    Offloaded blocks execute on the accelerator of the block before them (the first
    accelerator of the map for leading ones), or on the CPU when the map uses none.
    """
    targets = {str(key): normalize_device(device) for key, device in device_map.items()}
    _check_devices(targets, budgets)
    _check_keys(targets, profile)
    devices = _block_devices(profile, targets)
    _check_ties(profile, devices)
    placements = _with_execution_devices(profile, devices, targets)
    _warn_over_budget(profile, budgets, runtime_reserves, workload, placements)
    return placements, [f"manual map of {len(targets)} entries, as given"]


def _check_devices(targets: dict[str, str], budgets: Mapping[str, int]) -> None:
    unknown = sorted({device for device in targets.values() if device not in budgets}, key=device_order)
    if unknown:
        raise DeviceNotFoundError(
            f"the device map names {', '.join(unknown)}, which have no budget and are not on this "
            f"machine (known: {', '.join(budgets)}); add them to max_memory or map to known devices"
        )


def _check_keys(targets: dict[str, str], profile: Profile) -> None:
    names = [*profile.module_names, *(block.name for block in profile.blocks)]
    names += [name for block in profile.blocks for name in _leaves(block)]
    known = {prefix for name in names for prefix in _dotted_prefixes(name)}
    unknown = [key for key in targets if key and key not in known]
    if not unknown:
        return
    candidates = sorted(known)
    lines = []
    for key in unknown:
        close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(repr(name) for name in close)}?)" if close else ""
        lines.append(f"{key!r}{hint}")
    raise DeviceMapError(f"the device map names no module of {profile.name}: {'; '.join(lines)}")


def _dotted_prefixes(name: str) -> list[str]:
    """ "a.b.c" -> ["a", "a.b", "a.b.c"]: every module that holds the tensor or module ``name``."""
    parts = name.split(".")
    return [".".join(parts[:length]) for length in range(1, len(parts) + 1)]


def _leaves(block) -> tuple[str, ...]:
    return block.tensor_names or (block.name,)


def _device_for(name: str, targets: dict[str, str]) -> str | None:
    prefix = name
    while prefix:
        if prefix in targets:
            return targets[prefix]
        prefix = prefix.rpartition(".")[0]
    return targets.get("")


def _block_devices(profile: Profile, targets: dict[str, str]) -> dict[str, str]:
    uncovered, split, devices = [], [], {}
    for block in profile.blocks:
        found = {name: _device_for(name, targets) for name in _leaves(block)}
        if _computed_buffers_only(block) and not any(found.values()):
            continue
        uncovered += [name for name, device in found.items() if device is None]
        distinct = sorted({device for device in found.values() if device is not None}, key=device_order)
        if len(distinct) > 1:
            split.append(f"{block.name} ({', '.join(distinct)})")
        elif distinct:
            devices[block.name] = distinct[0]
    if uncovered:
        raise DeviceMapError(
            f"the device map covers no device for {len(uncovered)} weight(s): {first_of(uncovered, _LISTED)}; "
            "add entries for them, or a '' entry as the default"
        )
    if split:
        raise DeviceMapError(
            f"the device map splits block(s) that run as one unit across devices: {first_of(split, _LISTED)}; "
            "map each of them to one device"
        )
    return _with_buffer_blocks_beside_neighbours(profile, devices)


def _computed_buffers_only(block) -> bool:
    """A block of buffers alone (rotary frequencies): transformers' maps may leave it out."""
    return block.weight_bytes == 0 and block.buffer_bytes > 0


def _with_buffer_blocks_beside_neighbours(profile: Profile, devices: dict[str, str]) -> dict[str, str]:
    """Unmapped buffer-only blocks go where the block before them runs (or the one after, if first)."""
    names = [block.name for block in profile.blocks]
    placed = [name for name in names if name in devices]
    if not placed:
        return devices
    resolved, previous = {}, devices[placed[0]]
    for name in names:
        previous = devices.get(name, previous)
        resolved[name] = previous
    return resolved


def _check_ties(profile: Profile, devices: dict[str, str]) -> None:
    broken = [
        " and ".join(f"{name} on {devices[name]}" for name in group)
        for group in profile.tied
        if len({devices[name] for name in group}) > 1
    ]
    if broken:
        raise DeviceMapError(
            f"tied weights must share a device, but the map splits {'; '.join(broken)}; "
            "map the blocks of each tie to the same device"
        )


def _with_execution_devices(profile, devices, targets) -> list[Placement]:
    used = sorted({device for device in targets.values() if is_accelerator(device)}, key=device_order)
    current = used[0] if used else "cpu"
    placements = []
    for block in profile.blocks:
        device = devices[block.name]
        if device not in ("cpu", "disk"):
            current = device
        placements.append(Placement(block.name, device, current))
    return placements


def _warn_over_budget(profile, budgets, runtime_reserves, workload, placements) -> None:
    tokens = workload.batch_size * workload.max_tokens
    loads = {device: DeviceLoad(budget, tokens, runtime_reserves.get(device, 0)) for device, budget in budgets.items()}
    by_block = {placement.block: placement for placement in placements}
    for unit in price_units(profile, workload):
        placement = by_block[unit.name]
        assign(loads, unit, placement.device, placement.execution_device)
    for device, load in loads.items():
        if not load.fits():
            warnings.warn(
                f"the device map puts {format_size(load.used_bytes())} on {device} (weights "
                f"{format_size(load.weight_bytes)}, buffers {format_size(load.buffer_bytes)}, KV cache "
                f"{format_size(load.kv_bytes())}, activations {format_size(load.activation_bytes)}, streaming "
                f"{format_size(load.stream_bytes)}{load.runtime_note()}) but its budget is "
                f"{format_size(load.budget_bytes)}; it may run out of memory for this workload; move blocks to "
                "devices with room, or use a strategy such as 'auto'",
                stacklevel=4,
            )

