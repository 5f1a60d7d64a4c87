"""Profile × budgets × workload × strategy → Plan. Pure: no device, file or clock is touched.

Every strategy is an ordered partition of the model's units (blocks, with tied blocks
joined to the block that owns their tensor) over an ordered list of devices, each device
taking one contiguous run that it holds with a given batch×tokens of KV cache: the one
search (``search.pack``, and its limits for the most tokens that fit). What the compute
devices cannot hold goes to CPU memory, then disk (``split_offload``).
"""

import copy
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import accumulate

from ..devices import CUDA_RESERVE_ENV, describe_budgets, device_order, is_accelerator, normalize_device
from ..errors import DeviceMapError, DoesNotFitError
from ..model.profile import Profile
from ..units import format_size
from ..workload import Workload
from .ledger import STREAM_COPIES, DeviceLoad, Unit, assign, prefill_tokens, price_units
from .manual import plan_manual
from .plan import Placement, Plan
from .search import Open, largest_limit, pack, smallest_limit

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
OFFLOAD_TIERS = ("cpu", "disk")
# With no workload given, plans shorten the default sequence down to this, no further: a chat
# prompt with its template and an answer of a few hundred tokens; a model that cannot run
# that much is refused rather than planned for sequences too short to use.
MIN_DEFAULT_TOKENS = 256
_SHARE_STEPS = 2**50  # the share search divides a budget into this many steps: 50 halvings
Groups = list[list[Unit]]
LoadFactory = Callable[[str], DeviceLoad]
Placed = tuple[list[Placement], list[str]]  # placements and the reasons for them


@dataclass(frozen=True)
class Stored:
    """An offloaded unit and the tier keeping its weights."""

    unit: Unit
    tier: str


@dataclass(frozen=True)
class Offloaded:
    """An offloaded unit, the tier keeping its weights and the device computing it."""

    unit: Unit
    tier: str
    execution_device: str


@dataclass(frozen=True)
class OffloadSplit:
    """The leading units the compute devices keep, the offloaded rest, and why."""

    resident: tuple[Unit, ...]
    offloaded: tuple[Offloaded, ...]
    reasons: tuple[str, ...]


def make_plan(
    profile: Profile,
    budgets: Mapping[str, int],
    workload: Workload | None = None,
    device_map: str | int | Mapping = "auto",
    offload: bool = True,
    runtime_reserves: Mapping[str, int] | None = None,
) -> Plan:
    """Decide where every block of ``profile`` lives and computes.

    ``budgets`` are bytes per canonical device name; ``device_map`` is a strategy, a manual
    dict of module-name prefixes to devices, or one device. ``runtime_reserves`` are bytes
    per device that each device computing anything keeps beside its tensors, within its
    budget (``devices.runtime_reserves`` gives every GPU's).

    >>> from devicemap.model.profile import Block, Profile
    >>> profile = Profile("toy", "float32", tuple(Block(f"layers.{i}", 10) for i in range(4)))
    >>> make_plan(profile, {"cuda:0": 25, "cuda:1": 25}).device_map
    {'layers.0': 0, 'layers.1': 0, 'layers.2': 1, 'layers.3': 1}
    """
    budgets = dict(sorted(budgets.items(), key=lambda item: device_order(item[0])))
    reserves = dict(runtime_reserves or {})
    if workload is None:
        workload, strategy, (placements, reasons) = _place_longest(profile, budgets, reserves, device_map, offload)
    else:
        workload = workload.resolve(profile.max_context, profile.dtype)
        strategy, (placements, reasons) = _place(profile, budgets, reserves, workload, device_map, offload)
    reasons = [*reasons, *_prefill_reasons(profile, workload)]
    plan = Plan(
        profile, workload, tuple(budgets.items()), strategy, tuple(placements), tuple(reasons), tuple(reserves.items())
    )
    if not offload:
        _refuse_offload(plan)
    return plan


def _place_longest(
    profile: Profile, budgets: dict[str, int], reserves: dict[str, int], device_map: str | int | Mapping, offload: bool
) -> tuple[Workload, str, Placed]:
    """With no workload given: one sequence of the default length, or of the most tokens that fit down to the floor.

    A caller who gave no workload asked to run the model, not to reserve 4,096 tokens; a
    budget that holds the weights and a shorter sequence should load, as it does in
    transformers. Below ``MIN_DEFAULT_TOKENS`` the refusal for the floor stands.
    """
    default = Workload().resolve(profile.max_context, profile.dtype)

    def place(max_tokens: int) -> tuple[Workload, str, Placed] | None:
        workload = replace(default, max_tokens=max_tokens)
        try:
            return workload, *_place(profile, budgets, reserves, workload, device_map, offload)
        except DoesNotFitError:
            return None

    floor = min(MIN_DEFAULT_TOKENS, default.max_tokens)
    placed = place(default.max_tokens) or largest_limit(place, floor, default.max_tokens)
    if placed is None:
        _place(profile, budgets, reserves, replace(default, max_tokens=floor), device_map, offload)
    workload, strategy, (placements, reasons) = placed
    if workload.max_tokens == default.max_tokens:
        return placed
    shortened = (
        f"no workload given: planned for 1 × {workload.max_tokens:,} tokens, the most that fit "
        f"(the default is {default.max_tokens:,}); pass a Workload to plan for a longer one"
    )
    return workload, strategy, (placements, [shortened, *reasons])


def _prefill_reasons(profile: Profile, workload: Workload) -> list[str]:
    """How the prefill was planned, when it is not one forward over whole prompts as asked."""
    chunk = prefill_tokens(profile, workload)
    if chunk < workload.max_tokens:
        return [
            f"activations reserved for a prefill in chunks of {chunk:,} tokens per sequence, not all "
            f"{workload.max_tokens:,} at once, with each later chunk's mask and cache reads; loading sets "
            f"generation_config.prefill_chunk_size = {chunk} so that generate prefills that way"
        ]
    if workload.prefill_tokens >= workload.max_tokens:
        return []
    if profile.chunked_prefill:
        return [
            f"prefill planned whole: chunks of {workload.prefill_tokens:,} tokens would need more for the later "
            f"chunks' mask and cache reads than they save on activations at {workload.max_tokens:,} tokens"
        ]
    return [
        f"{profile.name}'s generate does not prefill in chunks (a model with its own code, an "
        "encoder-decoder or one with a recurrent state): activations reserved for the whole "
        f"{workload.max_tokens:,}-token prefill"
    ]


def _place(
    profile: Profile, budgets: dict[str, int], reserves: dict[str, int], workload: Workload,
    device_map: str | int | Mapping, offload: bool,
) -> tuple[str, Placed]:  # fmt: skip
    """The strategy's name (a device's, for one device), with its placements and reasons."""
    if isinstance(device_map, Mapping):
        return "manual", plan_manual(profile, budgets, reserves, workload, device_map)
    if isinstance(device_map, str) and device_map.strip().lower() in STRATEGIES:
        strategy = device_map.strip().lower()
        return strategy, _plan_strategy(profile, budgets, reserves, workload, strategy, offload)
    device = _single_device(device_map)
    return device, _plan_single(profile, budgets, reserves, workload, device)


def _plan_strategy(
    profile: Profile, budgets: dict[str, int], reserves: dict[str, int], workload: Workload, strategy: str,
    offload: bool,
) -> Placed:  # fmt: skip
    units = price_units(profile, workload)
    tokens = workload.batch_size * workload.max_tokens
    compute = _compute_devices(budgets)
    tiers = [tier for tier in OFFLOAD_TIERS if tier in budgets and tier not in compute] if offload else []
    if strategy == "balanced_low_0" and len(compute) > 1:
        low_0 = _plan_low_0(units, compute, budgets, reserves, tokens)
        if low_0 is not None:
            return low_0
    split = split_offload(units, compute, tiers, budgets, tokens, reserves)
    if split is None:
        raise _does_not_fit(profile, units, budgets, reserves, workload, compute, tiers, offload)
    if strategy == "sequential":
        groups = _pack(split.resident, compute, _loads_with(budgets, reserves, tokens, split.offloaded), tokens)
        reason = f"sequential: filled {', '.join(compute)} in order, each keeping its reserves"
    else:
        groups, capacity = _balance(split.resident, compute, budgets, reserves, split.offloaded, tokens)
        reason = _balanced_reason(strategy, compute, capacity, workload)
    return _placements(groups, compute, split.offloaded), [reason, *split.reasons]


def _compute_devices(budgets: Mapping[str, int]) -> list[str]:
    """The accelerators, or the CPU when there are none."""
    accelerators = [device for device in budgets if is_accelerator(device)]
    if "cpu" not in budgets and not accelerators:
        raise DeviceMapError(
            f"the budgets name no device that can compute ({', '.join(budgets)}); give a budget for "
            "'cpu' or an accelerator"
        )
    return accelerators or ["cpu"]


def _plan_low_0(
    units: list[Unit], accelerators: list[str], budgets: dict[str, int], reserves: dict[str, int], tokens: int
) -> Placed | None:
    """GPU 0 takes the shortest leading run that lets the other accelerators hold the rest."""
    first, rest = accelerators[0], accelerators[1:]
    loads = _loads_with(budgets, reserves, tokens, ())
    cut = smallest_limit(
        lambda cut: None if _pack(units[cut:], rest, loads, tokens) is None else cut, 0, len(units)
    )
    if cut is None or _pack(units[:cut], [first], loads, tokens) is None:
        return None
    groups, capacity = _balance(units[cut:], rest, budgets, reserves, (), tokens)
    reasons = [
        f"balanced_low_0: {first} holds {_block_count(units[:cut])} of {_block_count(units)} blocks, the fewest "
        f"that let {', '.join(rest)} hold the rest with the workload's reserves",
        _capacity_reason(capacity, tokens),
    ]
    return _placements([units[:cut], *groups], accelerators, ()), reasons


def _balance(
    units: Sequence[Unit], devices: Sequence[str], budgets: dict[str, int], reserves: dict[str, int],
    offloaded: Sequence[Offloaded], tokens: int,
) -> tuple[Groups, float]:  # fmt: skip
    """The contiguous split that lets the most batch×tokens of KV cache fit, and that amount.

    With nothing cached per token, the split that leaves the fullest device least full.
    Offloaded units already charged to a device cache per token there too, so they count.
    """
    loads = _loads_with(budgets, reserves, tokens, offloaded)
    rate = sum(unit.kv_bytes_per_token for unit in units) + sum(loads(device).kv_bytes_per_token for device in devices)
    if rate == 0:

        def within_share(step: int) -> Groups | None:
            shares = {device: budget * (step / _SHARE_STEPS) for device, budget in budgets.items()}
            return _pack(units, devices, _loads_with(shares, reserves, tokens, offloaded), tokens)

        return smallest_limit(within_share, 1, _SHARE_STEPS), float("inf")
    high = max(tokens, int(sum(loads(device).budget_bytes for device in devices) / rate) + 1)
    groups = largest_limit(lambda limit: _pack(units, devices, loads, limit), tokens, high)
    return groups, min(_capacity(loads(device), group) for device, group in zip(devices, groups))


def _capacity(load: DeviceLoad, units: Sequence[Unit]) -> float:
    load.place(*units)
    return load.token_capacity()


def split_offload(
    units: Sequence[Unit], compute: Sequence[str], tiers: Sequence[str], budgets: Mapping[str, int], tokens: int,
    runtime_reserves: Mapping[str, int],
) -> OffloadSplit | None:  # fmt: skip
    """Keep the longest leading run on the compute devices; the rest goes to CPU, then disk. None if nothing fits.

    Offloaded units execute on the last compute device, which keeps room for their KV
    cache and for streaming the largest of them. Where no split lets one device hold all
    of that, they are spread over the compute devices instead, each executing its share
    (by budget) and keeping room to stream its own.

    >>> from devicemap.planning.ledger import price_units
    >>> from devicemap.model.profile import Block, Profile
    >>> from devicemap.workload import Workload
    >>> toy = Profile("toy", "float32", tuple(Block(f"layers.{i}", 10) for i in range(5)))
    >>> units = price_units(toy, Workload(1, 1, "float32"))
    >>> split = split_offload(units, ["cuda:0"], ["cpu"], {"cuda:0": 45, "cpu": 100}, 1, {})
    >>> len(split.resident), [(o.unit.name, o.tier, o.execution_device) for o in split.offloaded][0]
    (2, ('layers.2', 'cpu', 'cuda:0'))
    """
    for execute in (_on_last, _spread) if len(compute) > 1 else (_on_last,):
        for cut in range(len(units), -1, -1):
            stored = _store_offloaded(units[cut:], tiers, budgets, tokens)
            if stored is None:
                continue
            offloaded = execute(stored, compute, budgets)
            loads = _loads_with(budgets, runtime_reserves, tokens, offloaded)
            if not all(loads(tier).fits(tokens) for tier in tiers):
                continue
            if _pack(units[:cut], compute, loads, tokens) is not None:
                reasons = _offload_reasons(units, cut, offloaded, compute)
                return OffloadSplit(tuple(units[:cut]), offloaded, reasons)
    return None


def _on_last(stored: Sequence[Stored], compute: Sequence[str], budgets: Mapping[str, int]) -> tuple[Offloaded, ...]:
    return tuple(Offloaded(s.unit, s.tier, compute[-1]) for s in stored)


def _spread(stored: Sequence[Stored], compute: Sequence[str], budgets: Mapping[str, int]) -> tuple[Offloaded, ...]:
    """Give each compute device a run of the offloaded units, in order, in proportion to its budget."""
    total = sum(budgets[device] for device in compute)
    offloaded, start, budget_so_far = [], 0, 0
    for device in compute:
        budget_so_far += budgets[device]
        share = budget_so_far / total if total > 0 else 0
        end = len(stored) if device == compute[-1] else round(len(stored) * share)
        offloaded += [Offloaded(s.unit, s.tier, device) for s in stored[start:end]]
        start = end
    return tuple(offloaded)


def _store_offloaded(
    units: Sequence[Unit], tiers: Sequence[str], budgets: Mapping[str, int], tokens: int
) -> tuple[Stored, ...] | None:
    """Put units on the offload tiers in order; CPU keeps room for staging disk-bound weights."""
    if units and not tiers:
        return None
    placed, rest = [], list(units)
    for tier in tiers:
        count = len(rest) if tier == tiers[-1] else _tier_prefix(rest, tier, budgets)
        placed += [Stored(unit, tier) for unit in rest[:count]]
        rest = rest[count:]
    loads = {device: DeviceLoad(budget, tokens) for device, budget in budgets.items()}
    for stored in placed:
        loads[stored.tier].store(stored.unit)
        if stored.tier == "disk" and "cpu" in loads:
            loads["cpu"].stream(stored.unit)
    return None if any(not loads[tier].fits(tokens) for tier in tiers) else tuple(placed)


def _tier_prefix(units: list[Unit], tier: str, budgets: Mapping[str, int]) -> int:
    """How many leading units a tier can store, leaving room to stage the rest from disk."""
    stored = list(accumulate((unit.weight_bytes for unit in units), initial=0))
    staged = list(accumulate((unit.weight_bytes * STREAM_COPIES for unit in reversed(units)), max, initial=0))[::-1]
    return next((count for count in range(len(units), -1, -1) if stored[count] + staged[count] <= budgets[tier]), 0)


def _pack(units: Sequence[Unit], devices: Sequence[str], loads: LoadFactory, tokens: float) -> Groups | None:
    """One run of units per device, each within its budget with ``tokens`` batch×tokens cached; None if none fits."""
    runs = pack(len(units), [_opener(loads(device), units, tokens) for device in devices])
    return None if runs is None else [list(units[run.start : run.stop]) for run in runs]


def _opener(charged: DeviceLoad, units: Sequence[Unit], tokens: float) -> Open:
    """Opens runs on a device already charged as ``charged``; none if even an empty run does not fit."""
    return partial(_LoadRun, charged, units, tokens) if charged.fits(tokens) else lambda start: None


class _LoadRun:
    """A run on a device, taking units while the device stays within its budget with ``tokens`` cached."""

    def __init__(self, charged: DeviceLoad, units: Sequence[Unit], tokens: float, start: int):
        self.charged, self.units, self.tokens, self.load = charged, units, tokens, None

    def __call__(self, index: int) -> bool:
        # Most runs are opened and replaced without growing: copy the device's load only once one grows.
        self.load = self.load or copy.copy(self.charged)
        return self.load.take(self.units[index], self.tokens)


def _loads_with(
    budgets: Mapping[str, int], reserves: Mapping[str, int], tokens: int, offloaded: Sequence[Offloaded]
) -> LoadFactory:
    """Fresh loads per device, already charged for the offloaded units where they are kept and execute."""
    loads = {name: DeviceLoad(budget, tokens, reserves.get(name, 0)) for name, budget in budgets.items()}
    for o in offloaded:
        assign(loads, o.unit, o.tier, o.execution_device)
    return lambda device: copy.copy(loads[device])


def _placements(groups: Groups, devices: Sequence[str], offloaded: Sequence[Offloaded]) -> list[Placement]:
    placements = [
        Placement(block.name, device, device)
        for device, group in zip(devices, groups)
        for unit in group
        for block in unit.blocks
    ]
    placements += [Placement(block.name, o.tier, o.execution_device) for o in offloaded for block in o.unit.blocks]
    return placements


def _single_device(device_map: str | int) -> str:
    try:
        return normalize_device(device_map)
    except DeviceMapError:
        raise DeviceMapError(
            f"device_map {device_map!r} is not understood; use a strategy ({', '.join(STRATEGIES)}), "
            "a dict of module names to devices, or one device (an int, 'cuda:N', 'mps' or 'cpu')"
        ) from None


def _plan_single(
    profile: Profile, budgets: dict[str, int], reserves: dict[str, int], workload: Workload, device: str
) -> Placed:
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
    load = DeviceLoad(budgets[device], workload.batch_size * workload.max_tokens, reserves.get(device, 0))
    load.place(*price_units(profile, workload))
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
        + load.runtime_note()
    )


def _does_not_fit(
    profile: Profile, units: list[Unit], budgets: dict[str, int], reserves: dict[str, int], workload: Workload,
    compute: list[str], tiers: list[str], offload: bool,
) -> DoesNotFitError:  # fmt: skip
    total = DeviceLoad(0, workload.batch_size * workload.max_tokens)
    total.place(*units)
    usable = {device: budgets[device] for device in [*compute, *tiers]}
    needs = (
        f"{profile.name} needs {format_size(total.used_bytes())} ({_breakdown(total)}) for "
        f"{workload.batch_size} × {workload.max_tokens}-token sequences; the budgets add to "
        f"{format_size(sum(usable.values()))} ({describe_budgets(usable)}){_less_runtime(reserves, compute)}"
    )
    smaller = "or use a smaller workload (batch_size or max_tokens) or dtype"
    if tiers:
        keeps = _offload_keeps(units, compute, tiers)
        return DoesNotFitError(
            f"{needs}, but the KV cache and activations stay on {', '.join(compute)}, and {keeps}, so no "
            f"contiguous split fits; add memory on {', '.join(compute)}, {smaller}"
        )
    shortfall = total.used_bytes() - sum(max(0, budgets[device] - reserves.get(device, 0)) for device in compute)
    more = f"at least {format_size(shortfall)} more" if shortfall > 0 else "more"
    advice = f"add {more} on {', '.join(compute)}, or max_memory for cpu or disk to offload weights"
    if not offload:
        advice = f"allow offload (drop offload=False / --no-offload), add {more} on {', '.join(compute)}"
    return DoesNotFitError(f"{needs}, and no contiguous split fits; {advice}, {smaller}")


def _less_runtime(reserves: Mapping[str, int], compute: Sequence[str]) -> str:
    """The runtime reserves the computing devices keep out of their budgets, for a refusal; "" when none."""
    kept = {device: reserves[device] for device in compute if reserves.get(device)}
    if not kept:
        return ""
    return (
        f", less the runtime reserve a device keeps when it computes ({describe_budgets(kept)}: the CUDA context's "
        f"kernels, cuBLAS workspaces, the allocator's rounding; {CUDA_RESERVE_ENV} sets it)"
    )


def _offload_keeps(units: Sequence[Unit], compute: Sequence[str], tiers: Sequence[str]) -> str:
    """What the computing devices keep for offloaded blocks, with the streaming room that may be what blocks."""
    offloaded = " or ".join(tiers)
    if compute == ["cpu"]:
        return f"cpu also keeps those of every block on {offloaded}, computed in place on the mapped file"
    room = format_size(STREAM_COPIES * max(unit.weight_bytes for unit in units))
    staging = ", and cpu as much again to stage it from disk" if "disk" in tiers else ""
    keeps = (
        f"{compute[-1]} also keeps those of every block on {offloaded} with room to stream it"
        if len(compute) == 1
        else f"the devices computing the blocks on {offloaded} also keep theirs, with room to stream them"
    )
    return f"{keeps} (up to {room} for the largest block, {STREAM_COPIES} copies{staging})"


def _refuse_offload(plan: Plan) -> None:
    """Offloading keeps a block's weights away from where it computes: on disk, or in CPU memory for a GPU."""
    offloaded = plan.offloaded()
    if not offloaded:
        return
    by_name = {block.name: block for block in plan.profile.blocks}
    offloaded_bytes = sum(by_name[placement.block].weight_bytes for placement in offloaded)
    kept = ", ".join(sorted({p.device for p in offloaded}, key=device_order))
    computing = ", ".join(sorted({p.execution_device for p in offloaded}, key=device_order))
    raise DoesNotFitError(
        f"with offload=False every block must stay on the device it computes on, but {len(offloaded)} "
        f"block(s) ({format_size(offloaded_bytes)}, from {offloaded[0].block}) would be kept on {kept} and "
        f"computed on {computing}; the budgets are {describe_budgets(dict(plan.budgets))}; add accelerator "
        "memory, shrink the workload or dtype, or allow offload"
    )


def _offload_reasons(
    units: Sequence[Unit], cut: int, offloaded: Sequence[Offloaded], compute: Sequence[str]
) -> tuple[str, ...]:
    if not offloaded:
        return ()
    tiers = sorted({o.tier for o in offloaded}, key=device_order)
    offloaded_bytes = sum(o.unit.weight_bytes for o in offloaded)
    executing = Counter(o.execution_device for o in offloaded)
    if len(executing) == 1:
        where = next(iter(executing))
    else:
        # Spread only when no device could hold the KV cache of every offloaded block.
        shares = ", ".join(f"{device} ({count})" for device, count in executing.items())
        where = f"{shares}, spread so that no one device holds the KV cache of them all"
    verb = "holds" if len(compute) == 1 else "hold"
    return (
        f"{', '.join(compute)} {verb} {_block_count(units[:cut])} of {_block_count(units)} blocks with the "
        f"workload's reserves; the last {_block_count(o.unit for o in offloaded)} ({format_size(offloaded_bytes)}) "
        f"are kept on {' then '.join(tiers)} and execute on {where}",
    )


def _block_count(units: Iterable[Unit]) -> int:
    """Blocks, as the plan's table counts them: a unit's tied followers count too."""
    return sum(len(unit.blocks) for unit in units)


def _balanced_reason(strategy: str, compute: Sequence[str], capacity: float, workload: Workload) -> str:
    return (
        f"{strategy}: contiguous split over {', '.join(compute)} that maximises the KV cache that fits; "
        + _capacity_reason(capacity, workload.batch_size * workload.max_tokens)
    )


def _capacity_reason(capacity: float, tokens: int) -> str:
    if capacity == float("inf"):
        return "nothing is cached per token, so the split evens out how full each device is"
    return f"{math.floor(capacity):,} batch×tokens of KV cache fit ({capacity / tokens:.2f}× the workload)"
