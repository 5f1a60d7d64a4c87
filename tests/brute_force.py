"""Every contiguous split of a small model, priced from the definitions, to check the planner.

The device accounting here is written again from the design, not taken from
``devicemap.ledger.DeviceLoad``: a device that computes some units holds their buffers,
fixed state, KV cache and the largest of their activations (logits included); it keeps
the weights of the units stored on it; and a device computing units stored elsewhere keeps
room to stream twice the largest of them, unless it is the CPU, which computes them in place
on the mapped file. The per-unit prices come from
``ledger.price_units``, which test_planner checks against hand-computed numbers.

Placement rule enumerated (the design's): a leading run of units is resident, one
contiguous (possibly empty) group per compute device in order; the remaining suffix is
offloaded, a leading part of it to CPU and the rest to disk, all executing on the last
compute device; CPU keeps room to stage twice the largest disk-bound unit.

Pipeline stages (``best_stage_split``): one non-empty contiguous run of units per rank,
each rank computing and keeping its whole run within its budget; a tie across ranks
becomes a copy of the shared tensor on every block that uses it. A decode step reads a
unit's weights (not the first unit's: it embeds by lookup) and half its KV cache.
"""

import math
from dataclasses import dataclass, replace
from itertools import combinations, combinations_with_replacement

from devicemap.devices import is_accelerator
from devicemap.model.profile import Profile
from devicemap.planning.ledger import Unit, price_units
from devicemap.workload import Workload

Groups = tuple[tuple[Unit, ...], ...]


@dataclass(frozen=True)
class Split:
    """One feasible placement: groups per compute device, and the offloaded suffix."""

    groups: Groups
    offloaded: tuple[Unit, ...]
    capacity: float
    max_share: float


@dataclass(frozen=True)
class Optimum:
    """All feasible splits that keep the most units resident."""

    compute: tuple[str, ...]
    resident: int
    splits: tuple[Split, ...]

    @property
    def best_capacity(self) -> float:
        return max(split.capacity for split in self.splits)

    @property
    def best_max_share(self) -> float:
        return min(split.max_share for split in self.splits)

    @property
    def fewest_on_first(self) -> int:
        return min(len(split.groups[0]) for split in self.splits)


def compute_devices(budgets: dict[str, int]) -> tuple[str, ...]:
    accelerators = tuple(device for device in budgets if is_accelerator(device))
    return accelerators or ("cpu",)


def spreads(plan) -> bool:
    """Whether some offloaded block executes elsewhere than on the last compute device."""
    last = compute_devices(dict(plan.budgets))[-1]
    return any(p.execution_device != last for p in plan.offloaded())


def offload_tiers(budgets: dict[str, int], offload: bool) -> tuple[str, ...]:
    compute = compute_devices(budgets)
    return tuple(t for t in ("cpu", "disk") if offload and t in budgets and t not in compute)


def solve(units: list[Unit], budgets: dict[str, int], tokens: int, offload: bool = True) -> Optimum | None:
    """The feasible splits with the longest resident run, or None if nothing fits."""
    compute = compute_devices(budgets)
    tiers = offload_tiers(budgets, offload)
    for resident in range(len(units), -1, -1):
        offloaded = tuple(units[resident:])
        if offloaded and not tiers_can_store(offloaded, tiers, budgets):
            continue
        splits = tuple(
            split
            for groups in contiguous_groups(units[:resident], len(compute))
            if (split := price_split(groups, offloaded, compute, budgets, tokens)) is not None
        )
        if splits:
            return Optimum(compute, resident, splits)
    return None


def solve_on_accelerators(units: list[Unit], budgets: dict[str, int], tokens: int) -> Optimum | None:
    """The feasible splits that keep every unit on the compute devices."""
    found = solve(units, budgets, tokens, offload=False)
    return found if found is not None and found.resident == len(units) else None


def contiguous_groups(units, parts: int):
    """Every way to cut ``units`` into ``parts`` ordered runs, empty runs allowed."""
    for cuts in combinations_with_replacement(range(len(units) + 1), parts - 1):
        bounds = (0, *cuts, len(units))
        yield tuple(tuple(units[bounds[i] : bounds[i + 1]]) for i in range(parts))


def tiers_can_store(offloaded: tuple[Unit, ...], tiers: tuple[str, ...], budgets: dict[str, int]) -> bool:
    if not tiers:
        return False
    if tiers == ("disk",):
        return total_weight(offloaded) <= budgets["disk"]
    if tiers == ("cpu",):
        return total_weight(offloaded) <= budgets["cpu"]
    return any(
        total_weight(offloaded[:on_cpu]) + stream_room(offloaded[on_cpu:]) <= budgets["cpu"]
        and total_weight(offloaded[on_cpu:]) <= budgets["disk"]
        for on_cpu in range(len(offloaded) + 1)
    )


def price_split(groups: Groups, offloaded, compute, budgets, tokens) -> Split | None:
    capacities, shares = [], []
    for index, (device, group) in enumerate(zip(compute, groups)):
        streamed = offloaded if index == len(compute) - 1 else ()
        fixed = fixed_bytes(group, group + streamed, streamed if device != "cpu" else ())
        rate = kv_rate(group + streamed)
        if fixed + rate * tokens > budgets[device]:
            return None
        shares.append((fixed + rate * tokens) / budgets[device])
        if group or streamed:
            capacities.append(math.inf if rate == 0 else (budgets[device] - fixed) / rate)
    return Split(groups, offloaded, min(capacities, default=math.inf), max(shares))


def fixed_bytes(stored, executed, streamed) -> int:
    return (
        total_weight(stored)
        + sum(unit.buffer_bytes + unit.fixed_kv_bytes for unit in executed)
        + max((unit.transient_bytes for unit in executed), default=0)
        + stream_room(streamed)
    )


def kv_rate(executed) -> float:
    return sum(unit.kv_bytes_per_token for unit in executed)


def total_weight(units) -> int:
    return sum(unit.weight_bytes for unit in units)


def stream_room(units) -> int:
    return 2 * max((unit.weight_bytes for unit in units), default=0)



def best_split_by_dp(units, compute, budgets, tokens, offloaded=(), score=None) -> float:
    """The best over all contiguous splits of the worst device's score, by dynamic programming.

    For models too big to enumerate. The default score is a device's KV capacity in
    batch×tokens (``-inf`` when over budget at ``tokens``); the last compute device also
    executes and streams ``offloaded``. Returns ``-inf`` when no split fits.
    """
    score = score or capacity_score
    best = [math.inf] + [-math.inf] * len(units)
    for position, device in enumerate(compute):
        streamed = tuple(offloaded) if position == len(compute) - 1 else ()
        best = [
            max(
                min(best[start], score(budgets[device], fixed, rate, tokens, busy))
                for start, fixed, rate, busy in runs_ending_at(units, end, streamed, device)
            )
            for end in range(len(units) + 1)
        ]
    return best[len(units)]


def runs_ending_at(units, end: int, streamed, device: str):
    """(start, fixed bytes, KV bytes per token, computes anything) of every run ``units[start:end]`` on ``device``."""
    room = stream_room(streamed) if device != "cpu" else 0
    weights = sum(unit.buffer_bytes + unit.fixed_kv_bytes for unit in streamed) + room
    peak = max((unit.transient_bytes for unit in streamed), default=0)
    rate = kv_rate(streamed)
    yield end, weights + peak, rate, bool(streamed)
    for start in range(end - 1, -1, -1):
        unit = units[start]
        weights += unit.weight_bytes + unit.buffer_bytes + unit.fixed_kv_bytes
        peak = max(peak, unit.transient_bytes)
        rate += unit.kv_bytes_per_token
        yield start, weights + peak, rate, True


def capacity_score(budget, fixed, rate, tokens, busy) -> float:
    if not busy:
        return math.inf
    if fixed + rate * tokens > budget:
        return -math.inf
    return math.inf if rate == 0 else (budget - fixed) / rate


def share_score(budget, fixed, rate, tokens, busy) -> float:
    """Minus how full the device is at ``tokens``, so that the best split is the least full."""
    used = fixed + rate * tokens
    return -math.inf if used > budget else -used / budget


def stage_units(profile: Profile, ranks: int, workload: Workload) -> list[Unit]:
    """The units stages are cut from: over several ranks, each tied block carries its own copy."""
    if ranks == 1:
        return price_units(profile, workload)
    position = {block.name: index for index, block in enumerate(profile.blocks)}
    extra = {block.name: 0 for block in profile.blocks}
    for group in profile.tied:
        owner, *users = sorted(group, key=lambda name: position[name])
        for name in users:
            extra[name] += profile.blocks[position[owner]].weight_bytes
    blocks = tuple(replace(block, weight_bytes=block.weight_bytes + extra[block.name]) for block in profile.blocks)
    return price_units(replace(profile, blocks=blocks, tied=()), workload)


def decode_step_bytes(units: list[Unit], workload: Workload) -> list[int]:
    """What one decode step reads in each unit: its weights (the first only looks rows up) and half its KV cache."""
    tokens = workload.batch_size * workload.max_tokens
    return [
        (0 if index == 0 else unit.weight_bytes) + round(unit.kv_bytes_per_token * tokens / 2)
        for index, unit in enumerate(units)
    ]


def best_stage_split(units: list[Unit], step_bytes: list[int], budgets: list[int], tokens: int) -> int | None:
    """The fewest bytes the slowest stage reads per step, over every split into fitting non-empty stages."""
    best = None
    for cuts in combinations(range(1, len(units)), len(budgets) - 1):
        bounds = (0, *cuts, len(units))
        runs = [range(bounds[rank], bounds[rank + 1]) for rank in range(len(budgets))]
        stages = [tuple(units[index] for index in run) for run in runs]
        needs = [fixed_bytes(stage, stage, ()) + kv_rate(stage) * tokens for stage in stages]
        if all(need <= budget for need, budget in zip(needs, budgets)):
            slowest = max(sum(step_bytes[index] for index in run) for run in runs)
            best = slowest if best is None else min(best, slowest)
    return best
