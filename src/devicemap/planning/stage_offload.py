"""Pipeline stages that outgrow their rank: the tail of a stage kept in the rank's own CPU memory or disk.

Used only when no split fits the ranks' budgets. The stages are then chosen by the same
exact search, with each rank's run allowed past its budget as long as the planner can
place it there: the longest leading part stays on the rank's device and the rest goes to
its CPU memory, then its disk, computing on the device (``planner._split_offload``, the
planner's own rule). An offloaded block is read from a slower tier at every step, so
the search counts its decode reads ``OFFLOADED_READ_WEIGHT`` times: a rank with room
keeps more blocks rather than letting another rank offload them. Each rank's final
placement is the planner's ``make_plan`` over a profile of just its stage's blocks.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from ..model.profile import Profile
from ..units import format_size
from ..workload import Workload
from .ledger import DeviceLoad, Unit
from .plan import Plan
from .planner import OFFLOAD_TIERS, _split_offload, make_plan

# Host memory reads at a tenth of a GPU's speed or less, disk at a tenth of host memory's:
# one weight for both keeps the search simple and still keeps offloading a last resort.
OFFLOADED_READ_WEIGHT = 10

RankOffload = Mapping[str, int]


@dataclass(frozen=True)
class _RankMemory:
    """Where one rank computes and the bytes it may use there and on its offload tiers."""

    compute: str
    budgets: Mapping[str, int]
    tokens: int

    @property
    def tiers(self) -> list[str]:
        return [tier for tier in OFFLOAD_TIERS if tier in self.budgets and tier != self.compute]

    def resident_count(self, units: list[Unit]) -> int | None:
        """How many leading units stay on the device, the rest offloaded; None if the run cannot be placed."""
        split = _split_offload(units, [self.compute], self.tiers, dict(self.budgets), self.tokens)
        return None if split is None else len(split[0])


def split_offloading(
    profile: Profile,
    units: list[Unit],
    step_bytes: list[int],
    rank_budgets: Sequence[int],
    workload: Workload,
    offload: Sequence[RankOffload],
    device: str,
) -> list[Plan] | None:
    """One local plan per rank, over its stage's blocks, some offloaded; None if even offloading cannot fit.

    >>> plans = split_offloading(profile, units, steps, [2**30, 2**28], workload, [{"disk": 2**34}] * 2, "cpu")  # doctest: +SKIP
    >>> plans[1].offloaded()[-1]  # doctest: +SKIP
    Placement(block='lm_head', device='disk', execution_device='cpu')
    """
    tokens = workload.batch_size * workload.max_tokens
    memories = [
        _rank_memory(rank, budget, allowance, device, tokens)
        for rank, (budget, allowance) in enumerate(zip(rank_budgets, offload, strict=True))
    ]
    groups = smallest_limit(
        lambda limit: _pack(units, step_bytes, memories, limit),
        max(step_bytes),
        sum(step_bytes) * OFFLOADED_READ_WEIGHT,
    )
    if groups is None:
        return None
    return [_local_plan(profile, units, group, memory, workload) for group, memory in zip(groups, memories)]


def smallest_limit(pack: Callable[[int], list | None], low: int, high: int) -> list | None:
    """``pack(limit)`` at the smallest limit in [low, high] where it packs (not None); None if none does.

    Packing must only get easier as the limit grows.

    >>> smallest_limit(lambda limit: [limit] if limit >= 7 else None, 0, 100)
    [7]
    """
    if pack(high) is None:
        return None
    while low < high:
        middle = (low + high) // 2
        if pack(middle) is None:
            low = middle + 1
        else:
            high = middle
    return pack(high)


def _rank_memory(rank: int, budget: int, allowance: RankOffload, device: str, tokens: int) -> _RankMemory:
    if device == "cpu":
        # A CPU rank's own memory is its budget: it can offload only to disk.
        return _RankMemory("cpu", {"cpu": budget, "disk": allowance.get("disk", 0)}, tokens)
    tiers = {tier: allowance[tier] for tier in OFFLOAD_TIERS if tier in allowance}
    return _RankMemory(f"cuda:{rank}", {f"cuda:{rank}": budget, **tiers}, tokens)


def _pack(units: list[Unit], step_bytes: list[int], memories: list[_RankMemory], limit: int):
    """Each rank in turn takes the longest run it can place whose weighted reads stay within ``limit``."""
    groups, index = [], 0
    for rank, memory in enumerate(memories):
        later_ranks = len(memories) - rank - 1
        start, load = index, DeviceLoad(memory.budgets[memory.compute], memory.tokens)
        cost, overflowed = 0, False
        while index < len(units) - later_ranks:
            # While the run fits the device the running ledger decides cheaply; once it does
            # not (and a run only grows), the planner's split says what is offloaded.
            overflowed = overflowed or not load.would_fit(units[index], memory.tokens)
            if overflowed:
                extended = _weighted_reads(units, step_bytes, memory, start, index + 1)
            else:
                load.store(units[index])
                load.execute(units[index])
                extended = cost + step_bytes[index]
            if extended is None or (index > start and extended > limit):
                break
            cost = extended
            index += 1
        if index == start or cost > limit:
            return None
        groups.append(range(start, index))
    return groups if index == len(units) else None


def _weighted_reads(units, step_bytes, memory: _RankMemory, start: int, stop: int) -> int | None:
    resident = memory.resident_count(units[start:stop])
    if resident is None:
        return None
    middle = start + resident
    return sum(step_bytes[start:middle]) + OFFLOADED_READ_WEIGHT * sum(step_bytes[middle:stop])


def _local_plan(profile: Profile, units: list[Unit], group: range, memory: _RankMemory, workload: Workload) -> Plan:
    names = {block.name for index in group for block in units[index].blocks}
    stage = replace(profile, blocks=tuple(block for block in profile.blocks if block.name in names), tied=())
    return make_plan(stage, memory.budgets, workload, "auto")


def describe_allowances(offload: Sequence[RankOffload]) -> str:
    """What each rank may offload, e.g. "rank 0 disk 10.0 GiB, rank 1 cpu 4.0 GiB and disk 10.0 GiB".

    >>> describe_allowances([{"disk": 2**30}])
    'rank 0 disk 1.0 GiB'
    """
    return ", ".join(
        f"rank {rank} " + (" and ".join(f"{tier} {format_size(size)}" for tier, size in allowance.items()) or "none")
        for rank, allowance in enumerate(offload)
    )
