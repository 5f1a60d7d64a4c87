"""Profile × budgets × workload × strategy → Plan. Pure: no device, file or clock is touched.

Every strategy is an ordered partition of the model's units (blocks, with tied blocks
joined to the block that owns their tensor) over an ordered list of devices, each device
taking one contiguous run. ``_pack`` is the one primitive: given how many batch×tokens of
KV cache every device must hold, each device takes the longest run that fits. Because a
device's cost only grows as its run grows, the greedy packing finds a feasible partition
whenever one exists, so a binary search over the KV tokens finds the best split exactly.
"""

import copy
import math
from collections import Counter
from collections.abc import Callable, Mapping

from ..devices import device_order, is_accelerator, normalize_device
from ..errors import DeviceMapError, DoesNotFitError
from ..model.profile import Profile
from ..units import format_size
from ..workload import Workload
from .ledger import STREAM_COPIES, DeviceLoad, Unit, assign, price_units
from .manual import plan_manual
from .plan import Placement, Plan

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD_TIERS = ("cpu", "disk")
_SHARE_STEPS = 50

Groups = list[list[Unit]]
LoadFactory = Callable[[str], DeviceLoad]


def make_plan(
    profile: Profile,
    budgets: Mapping[str, int],
    workload: Workload | None = None,
    device_map: str | int | Mapping = "auto",
    offload: bool = True,
) -> Plan:
    """Decide where every block of ``profile`` lives and computes.

    ``budgets`` are bytes per canonical device name; ``device_map`` is a strategy, a manual
    dict of module-name prefixes to devices, or one device.

    >>> from devicemap.model.profile import Block, Profile
    >>> profile = Profile("toy", "float32", tuple(Block(f"layers.{i}", 10) for i in range(4)))
    >>> make_plan(profile, {"cuda:0": 25, "cuda:1": 25}).device_map
    {'layers.0': 0, 'layers.1': 0, 'layers.2': 1, 'layers.3': 1}
    """
    workload = (workload or Workload()).resolve(profile.max_context, profile.dtype)
    budgets = dict(sorted(budgets.items(), key=lambda item: device_order(item[0])))
    if isinstance(device_map, Mapping):
        placements, reasons = plan_manual(profile, budgets, workload, device_map)
        return _finish(profile, workload, budgets, "manual", placements, reasons, offload)
    if isinstance(device_map, str) and device_map.strip().lower() in STRATEGIES:
        strategy = device_map.strip().lower()
        placements, reasons = _plan_strategy(profile, budgets, workload, strategy, offload)
        return _finish(profile, workload, budgets, strategy, placements, reasons, offload)
    device = _single_device(device_map)
    placements, reasons = _plan_single(profile, budgets, workload, device)
    return _finish(profile, workload, budgets, device, placements, reasons, offload)


def _finish(profile, workload, budgets, strategy, placements, reasons, offload) -> Plan:
    plan = Plan(profile, workload, tuple(budgets.items()), strategy, tuple(placements), tuple(reasons))
    if not offload:
        _refuse_offload(plan)
    return plan


def _plan_strategy(profile, budgets, workload, strategy, offload):
    units = price_units(profile, workload)
    tokens = workload.batch_size * workload.max_tokens
    accelerators = [device for device in budgets if is_accelerator(device)]
    compute = accelerators or ["cpu"]
    tiers = [tier for tier in OFFLOAD_TIERS if tier in budgets and tier not in compute] if offload else []
    if "cpu" not in budgets and not accelerators:
        raise DeviceMapError(
            f"the budgets name no device that can compute ({', '.join(budgets)}); give a budget for "
            "'cpu' or an accelerator"
        )
    if strategy == "balanced_low_0" and len(accelerators) > 1:
        low_0 = _plan_low_0(units, accelerators, budgets, tokens)
        if low_0 is not None:
            return low_0
    split = _split_offload(units, compute, tiers, budgets, tokens)
    if split is None:
        raise _does_not_fit(profile, units, budgets, workload, compute, tiers, offload)
    resident, offloaded, reasons = split
    loads = _factory(budgets, tokens, offloaded)
    if strategy == "sequential":
        groups = _pack(resident, compute, loads, tokens)
        reasons.insert(0, f"sequential: filled {', '.join(compute)} in order, each keeping its reserves")
    else:
        groups, capacity = _balance(resident, compute, loads, tokens)
        reasons.insert(0, _balanced_reason(strategy, compute, capacity, workload))
    return _placements(groups, compute, offloaded), reasons


def _plan_low_0(units, accelerators, budgets, tokens):
    """GPU 0 takes the shortest leading run that lets the other accelerators hold the rest."""
    first, rest = accelerators[0], accelerators[1:]
    loads = _factory(budgets, tokens, [])
    for cut in range(len(units) + 1):
        head = _pack(units[:cut], [first], loads, tokens)
        if head is None:
            return None
        if _pack(units[cut:], rest, loads, tokens) is not None:
            groups, capacity = _balance(units[cut:], rest, loads, tokens)
            reasons = [
                f"balanced_low_0: {first} holds {_block_count(units[:cut])} of {_block_count(units)} blocks, "
                f"the fewest that let {', '.join(rest)} hold the rest with the workload's reserves",
                _capacity_reason(capacity, tokens),
            ]
            return _placements(head + groups, accelerators, []), reasons
    return None


def _split_offload(units, compute, tiers, budgets, tokens):
    """Keep the longest leading run on the compute devices; the rest goes to CPU, then disk.

    Returns (resident units, [(unit, tier, execution device)], reasons), or None if nothing
    fits. Offloaded units execute on the last compute device, which keeps room for their
    KV cache and for streaming the largest of them. Where no split lets one device hold
    all of that, they are spread over the compute devices instead, each executing its
    share (by budget) and keeping room to stream its own.
    """
    for spread in (False, True) if len(compute) > 1 else (False,):
        for cut in range(len(units), -1, -1):
            stored = _store_offloaded(units[cut:], tiers, budgets, tokens)
            if stored is None:
                continue
            offloaded = _spread(stored, compute, budgets) if spread else [(u, t, compute[-1]) for u, t in stored]
            loads = _factory(budgets, tokens, offloaded)
            if not all(loads(tier).fits(tokens) for tier in tiers):
                continue
            if _pack(units[:cut], compute, loads, tokens) is not None:
                return units[:cut], offloaded, _offload_reasons(units, cut, offloaded, compute)
    return None


def _spread(stored, compute, budgets):
    """Give each compute device a run of the offloaded units, in order, in proportion to its budget."""
    total = sum(budgets[device] for device in compute)
    offloaded, start, budget_so_far = [], 0, 0
    for device in compute:
        budget_so_far += budgets[device]
        share = budget_so_far / total if total > 0 else 0
        end = len(stored) if device == compute[-1] else round(len(stored) * share)
        offloaded += [(unit, tier, device) for unit, tier in stored[start:end]]
        start = end
    return offloaded


def _store_offloaded(units, tiers, budgets, tokens):
    """Put units on the offload tiers in order; CPU keeps room for staging disk-bound weights."""
    if units and not tiers:
        return None
    placed, rest = [], list(units)
    for position, tier in enumerate(tiers):
        last_tier = position == len(tiers) - 1
        count = len(rest) if last_tier else _tier_prefix(rest, tier, budgets, tokens)
        placed += [(unit, tier) for unit in rest[:count]]
        rest = rest[count:]
    loads = {device: DeviceLoad(budget, tokens) for device, budget in budgets.items()}
    for unit, tier in placed:
        loads[tier].store(unit)
        if tier == "disk" and "cpu" in loads:
            loads["cpu"].stream(unit)
    if rest or any(not loads[tier].fits(tokens) for tier in tiers):
        return None
    return placed


def _tier_prefix(units, tier, budgets, tokens) -> int:
    """How many leading units a tier can store, leaving room to stage the rest from disk."""
    stored = [0]
    for unit in units:
        stored.append(stored[-1] + unit.weight_bytes)
    staged = [0] * (len(units) + 1)
    for index in range(len(units) - 1, -1, -1):
        staged[index] = max(staged[index + 1], units[index].weight_bytes * STREAM_COPIES)
    for count in range(len(units), -1, -1):
        if stored[count] + staged[count] <= budgets[tier]:
            return count
    return 0


def _factory(budgets, tokens, offloaded) -> LoadFactory:
    """Fresh loads per device, already charged for the offloaded units where they are kept and execute."""
    loads = {name: DeviceLoad(budget, tokens) for name, budget in budgets.items()}
    for unit, tier, execution_device in offloaded:
        assign(loads, unit, tier, execution_device)
    return lambda device: copy.copy(loads[device])


def _pack(units, devices, make_load: LoadFactory, tokens: float, share: float = 1.0) -> Groups | None:
    """Each device in turn takes the longest run of units that fits; None if some are left."""
    groups, index = [], 0
    for device in devices:
        load, group = make_load(device), []
        while index < len(units) and load.would_fit(units[index], tokens, share):
            load.store(units[index])
            load.execute(units[index])
            group.append(units[index])
            index += 1
        if not load.fits(tokens, share):
            return None
        groups.append(group)
    return groups if index == len(units) else None


def _balance(units, devices, make_load: LoadFactory, tokens: int) -> tuple[Groups, float]:
    """The contiguous split that lets the most batch×tokens of KV cache fit, and that amount.

    With nothing cached per token, the split that leaves the fullest device least full.
    Offloaded units already charged to a device cache per token there too, so they count.
    """
    rate = sum(unit.kv_bytes_per_token for unit in units) + sum(
        make_load(device).kv_bytes_per_token for device in devices
    )
    if rate == 0:
        return _balance_shares(units, devices, make_load, tokens), float("inf")
    low = tokens
    high = max(low, int(sum(make_load(device).budget_bytes for device in devices) / rate) + 1)
    while low < high:
        middle = (low + high + 1) // 2
        if _pack(units, devices, make_load, middle) is None:
            high = middle - 1
        else:
            low = middle
    return _pack(units, devices, make_load, low), _capacity(units, devices, make_load, low)


def _balance_shares(units, devices, make_load, tokens) -> Groups:
    low, high = 0.0, 1.0
    for _ in range(_SHARE_STEPS):
        middle = (low + high) / 2
        if _pack(units, devices, make_load, tokens, middle) is None:
            low = middle
        else:
            high = middle
    return _pack(units, devices, make_load, tokens, high)


def _capacity(units, devices, make_load, tokens) -> float:
    capacities = []
    for device, group in zip(devices, _pack(units, devices, make_load, tokens)):
        load = make_load(device)
        for unit in group:
            load.store(unit)
            load.execute(unit)
        capacities.append(load.token_capacity())
    return min(capacities)


def _placements(groups: Groups, devices, offloaded) -> list[Placement]:
    placements = [
        Placement(block.name, device, device)
        for device, group in zip(devices, groups)
        for unit in group
        for block in unit.blocks
    ]
    placements += [
        Placement(block.name, tier, execution_device)
        for unit, tier, execution_device in offloaded
        for block in unit.blocks
    ]
    return placements


def _single_device(device_map) -> str:
    try:
        return normalize_device(device_map)
    except DeviceMapError:
        raise DeviceMapError(
            f"device_map {device_map!r} is not understood; use a strategy ({', '.join(STRATEGIES)}), "
            "a dict of module names to devices, or one device (an int, 'cuda:N', 'mps' or 'cpu')"
        ) from None


def _plan_single(profile, budgets, workload, device):
    if device == "disk":
        raise DeviceMapError(
            "device_map='disk' cannot compute anything; use 'cpu' or an accelerator, or 'auto' "
            "with a max_memory budget to offload part of the model to disk"
        )
    if device not in budgets:
        raise DeviceMapError(
            f"device_map={device!r} names a device with no budget; the budgets cover "
            f"{', '.join(budgets)}; add max_memory for {device} or pick one of those"
        )
    units = price_units(profile, workload)
    load = DeviceLoad(budgets[device], workload.batch_size * workload.max_tokens)
    for unit in units:
        load.store(unit)
        load.execute(unit)
    if not load.fits():
        raise DoesNotFitError(
            f"everything on {device} needs {format_size(load.used_bytes())} ({_breakdown(load)}) "
            f"but its budget is {format_size(budgets[device])}; use device_map='auto' to spread "
            "the model over more devices, or a smaller workload or dtype"
        )
    placements = [Placement(block.name, device, device) for block in profile.blocks]
    return placements, [f"everything on {device}, as asked"]


def _breakdown(load: DeviceLoad) -> str:
    return (
        f"weights {format_size(load.weight_bytes)}, buffers {format_size(load.buffer_bytes)}, "
        f"KV cache {format_size(load.kv_bytes())}, activations {format_size(load.activation_bytes)}"
    )


def _does_not_fit(profile, units, budgets, workload, compute, tiers, offload) -> DoesNotFitError:
    tokens = workload.batch_size * workload.max_tokens
    total = DeviceLoad(0, tokens)
    for unit in units:
        total.store(unit)
        total.execute(unit)
    usable = {device: budgets[device] for device in [*compute, *tiers]}
    needs = (
        f"{profile.name} needs {format_size(total.used_bytes())} ({_breakdown(total)}) for "
        f"{workload.batch_size} × {workload.max_tokens}-token sequences; the budgets add to "
        f"{format_size(sum(usable.values()))} ({', '.join(f'{d} {format_size(b)}' for d, b in usable.items())})"
    )
    smaller = "or use a smaller workload (batch_size or max_tokens) or dtype"
    if tiers:
        keeps = (
            f"{compute[-1]} also keeps those of every block on {' or '.join(tiers)} with room to stream it"
            if len(compute) == 1
            else f"the devices computing the blocks on {' or '.join(tiers)} also keep theirs, with room to stream them"
        )
        return DoesNotFitError(
            f"{needs}, but the KV cache and activations stay on {', '.join(compute)}, and {keeps}, so no "
            f"contiguous split fits; add memory on {', '.join(compute)}, {smaller}"
        )
    shortfall = total.used_bytes() - sum(budgets[device] for device in compute)
    more = f"at least {format_size(shortfall)} more" if shortfall > 0 else "more"
    advice = f"add {more} on {', '.join(compute)}, or max_memory for cpu or disk to offload weights"
    if not offload:
        advice = f"allow offload (drop offload=False / --no-offload), add {more} on {', '.join(compute)}"
    return DoesNotFitError(f"{needs}, and no contiguous split fits; {advice}, {smaller}")


def _refuse_offload(plan: Plan) -> None:
    """Offloading keeps a block's weights away from where it computes: on disk, or in CPU memory for a GPU."""
    offloaded = [placement for placement in plan.placements if placement.device != placement.execution_device]
    if not offloaded:
        return
    by_name = {block.name: block for block in plan.profile.blocks}
    offloaded_bytes = sum(by_name[placement.block].weight_bytes for placement in offloaded)
    kept = ", ".join(sorted({p.device for p in offloaded}, key=device_order))
    computing = ", ".join(sorted({p.execution_device for p in offloaded}, key=device_order))
    raise DoesNotFitError(
        f"with offload=False every block must stay on the device it computes on, but {len(offloaded)} "
        f"block(s) ({format_size(offloaded_bytes)}, from {offloaded[0].block}) would be kept on {kept} and "
        f"computed on {computing}; the budgets are "
        f"{', '.join(f'{d} {format_size(b)}' for d, b in plan.budgets)}; add accelerator memory, "
        "shrink the workload or dtype, or allow offload"
    )


def _offload_reasons(units, cut, offloaded, compute) -> list[str]:
    if not offloaded:
        return []
    tiers = sorted({tier for _, tier, _ in offloaded}, key=device_order)
    offloaded_bytes = sum(unit.weight_bytes for unit, _, _ in offloaded)
    executing = Counter(device for _, _, device in offloaded)
    if len(executing) == 1:
        where = next(iter(executing))
    else:
        # Spread only when no device could hold the KV cache of every offloaded block.
        shares = ", ".join(f"{device} ({count})" for device, count in executing.items())
        where = f"{shares}, spread so that no one device holds the KV cache of them all"
    verb = "holds" if len(compute) == 1 else "hold"
    return [
        f"{', '.join(compute)} {verb} {_block_count(units[:cut])} of {_block_count(units)} blocks with the "
        f"workload's reserves; the last {_block_count(unit for unit, _, _ in offloaded)} "
        f"({format_size(offloaded_bytes)}) are kept on {' then '.join(tiers)} and "
        f"execute on {where}"
    ]


def _block_count(units) -> int:
    """Blocks, as the plan's table counts them: a unit's tied followers count too."""
    return sum(len(unit.blocks) for unit in units)


def _balanced_reason(strategy, compute, capacity, workload) -> str:
    return (
        f"{strategy}: contiguous split over {', '.join(compute)} that maximises the KV cache that fits; "
        + _capacity_reason(capacity, workload.batch_size * workload.max_tokens)
    )


def _capacity_reason(capacity: float, tokens: int) -> str:
    if capacity == float("inf"):
        return "nothing is cached per token, so the split evens out how full each device is"
    return f"{math.floor(capacity):,} batch×tokens of KV cache fit ({capacity / tokens:.2f}× the workload)"
