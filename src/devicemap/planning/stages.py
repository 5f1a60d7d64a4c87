"""Pipeline stages: the contiguous run of blocks each rank holds.

Every rank is one computing device with its own budget, and must hold its blocks'
weights with the workload's KV cache and activations, priced by the planner's own
ledger. A pipeline runs as fast as its slowest stage, so among the splits that fit, the
one whose slowest stage reads the fewest bytes per decode step wins: an output head is
as costly as several layers, an embedding lookup costs almost nothing. Weights tied
across stages (an embedding reused as the head) are held by both stages that use them.

A rank prefills each micro-batch's prompts in one forward: transformers' chunked prefill
lives in its ``generate``, which the pipeline's schedule does not run, so stages reserve
activations for whole prompts whatever chunk the workload asks for.

Only when no split fits the ranks' budgets may a rank keep the tail of its stage in its
own CPU memory or disk. The same search then lets a rank's run grow past its budget as
long as the planner's own rule (``planner.split_offload``) can place it, counting an
offloaded block's decode reads ``OFFLOADED_READ_WEIGHT`` times: a rank with room keeps
more blocks rather than letting another offload them. Each rank's final placement is
the planner's ``make_plan`` over a profile of just its stage's blocks.

A rank's budget is its stage's alone: what the rank holds beside its stage (its CUDA
context's runtime reserve and NCCL's buffers) is kept out of it before it gets here
(``pipeline.worker.budget_beside_rank``), so stages are priced with no runtime reserve.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial

from ..devices import describe_budgets
from ..errors import DoesNotFitError, PipelineError
from ..model.profile import Profile
from ..units import format_size, parse_size, split_assignments
from ..workload import Workload
from .ledger import DeviceLoad, Unit, price_units
from .plan import Placement, Plan, Stage, StagePlan
from .planner import OFFLOAD_TIERS, make_plan, split_offload
from .search import pack, smallest_limit

# Host memory reads at a tenth of a GPU's speed or less, disk at a tenth of host memory's:
# one weight for both keeps the search simple and still keeps offloading a last resort.
OFFLOADED_READ_WEIGHT = 10

RankBudgets = Mapping[int | str, int | str] | Sequence[int | str] | str
RankOffload = Mapping[str, int]


def split_stages(
    profile: Profile,
    rank_budgets: Sequence[int],
    workload: Workload | None = None,
    offload: Sequence[RankOffload] | None = None,
    device: str = "cuda",
) -> StagePlan:
    """Split ``profile`` into one contiguous, non-empty stage per rank; pure, like the planner.

    ``rank_budgets`` are bytes per rank, in rank order. Each rank must hold its blocks'
    weights and the workload's KV cache and activations, priced as the planner prices
    them; among the splits that fit, the one whose slowest stage reads the fewest bytes
    per decode step is chosen exactly (a binary search on that limit, ``search.pack``
    finding a split under it whenever one exists).

    When no split fits, ``offload`` (per rank, bytes it may keep on "cpu" and "disk"; a
    ``device="cpu"`` rank computes in its CPU budget and offloads to disk only) lets ranks
    keep the tail of their stage there, as this module's docstring explains.

    >>> from devicemap.model.profile import Block, Profile
    >>> layers = tuple(Block(f"layers.{i}", 10) for i in range(4))
    >>> toy = Profile("toy", "float32", (Block("embed", 20), *layers, Block("head", 20)))
    >>> [stage.blocks for stage in split_stages(toy, [100, 100]).stages]
    [('embed', 'layers.0', 'layers.1', 'layers.2'), ('layers.3', 'head')]
    """
    if len(rank_budgets) > len(profile.blocks) or not rank_budgets:
        raise PipelineError(
            f"{profile.name} has {len(profile.blocks)} blocks, which cannot make {len(rank_budgets)} non-empty "
            "stages; use between 1 stage and as many stages as blocks"
        )
    staged = _copy_tied_weights(profile) if len(rank_budgets) > 1 else profile
    # Ranks prefill each micro-batch's prompts in one forward (``schedule``), not in chunks.
    workload = replace((workload or Workload()).resolve(staged.max_context, staged.dtype), prefill_chunk=0)
    units = price_units(staged, workload)
    step_bytes = [_step_bytes(unit, index, workload) for index, unit in enumerate(units)]
    tokens = workload.batch_size * workload.max_tokens
    ranks = [_rank_device(rank) for rank in range(len(rank_budgets))]
    alone = [_RankMemory(rank, {rank: budget}, tokens) for rank, budget in zip(ranks, rank_budgets)]
    groups = _split_ranks(units, step_bytes, alone, sum(step_bytes))
    if groups is None and offload is not None:
        memories = [
            _rank_memory(rank, budget, allowance, device, tokens)
            for rank, (budget, allowance) in enumerate(zip(rank_budgets, offload, strict=True))
        ]
        offloading = _split_ranks(units, step_bytes, memories, sum(step_bytes) * OFFLOADED_READ_WEIGHT)
        if offloading is not None:
            plans = [_local_plan(staged, units, group, memory, workload) for group, memory in zip(offloading, memories)]
            return _offloading_stage_plan(staged, workload, plans, rank_budgets)
    if groups is None:
        raise _does_not_fit(staged, rank_budgets, workload, offload)
    return _stage_plan(staged, workload, units, step_bytes, groups, rank_budgets)


def _stage_plan(
    profile: Profile, workload: Workload, units: list[Unit], step_bytes: list[int], groups: list[range],
    rank_budgets: Sequence[int],
) -> StagePlan:  # fmt: skip
    placements = tuple(
        Placement(block.name, _rank_device(rank), _rank_device(rank))
        for rank, group in enumerate(groups)
        for index in group
        for block in units[index].blocks
    )
    budgets = tuple((_rank_device(rank), budget) for rank, budget in enumerate(rank_budgets))
    slowest = max(sum(step_bytes[index] for index in group) for group in groups)
    reason = (
        f"stages balance the bytes a decode step reads (weights, the embedding lookup aside, and the KV cache "
        f"at half the workload's length): the slowest reads {format_size(slowest)} of "
        f"{format_size(sum(step_bytes))} in all"
    )
    plan = Plan(profile, workload, budgets, "pipeline", placements, (reason,))
    stages = tuple(_stage(rank, plan, device, budget) for rank, (device, budget) in enumerate(budgets))
    return StagePlan(profile, workload, stages, plan.reasons + (_capacity_reason(plan),))


def _step_bytes(unit: Unit, index: int, workload: Workload) -> int:
    """What one decode step reads in a unit: its weights and, on average, half its KV cache.

    The first block of a decoder-only model embeds token ids: a lookup of one row per token.
    Bytes alone rank the stages, the last one's extra work included: measured on the demo
    model (one CPU thread, float32, 4 sequences a step), the output head over the whole
    vocabulary takes 12 ms for its 113 MB and a decoder layer 1.6 ms for its 14 MB, the
    same rate, while sampling and logits processing take 0.3 ms, a fifth of a layer.
    """
    weights = 0 if index == 0 else unit.weight_bytes
    return weights + round(unit.kv_bytes_per_token * workload.batch_size * workload.max_tokens / 2)


@dataclass(frozen=True)
class _RankMemory:
    """Where one rank computes and the bytes it may use there and on its offload tiers, if any."""

    compute: str
    budgets: Mapping[str, int]
    tokens: int

    def weighted_reads(self, units: list[Unit], step_bytes: list[int], start: int, stop: int) -> int | None:
        """The decode reads of ``units[start:stop]``, offloaded ones weighted; None if the run cannot be placed."""
        tiers = [tier for tier in OFFLOAD_TIERS if tier in self.budgets and tier != self.compute]
        split = split_offload(units[start:stop], [self.compute], tiers, dict(self.budgets), self.tokens, {})
        if split is None:
            return None
        middle = start + len(split.resident)
        return sum(step_bytes[start:middle]) + OFFLOADED_READ_WEIGHT * sum(step_bytes[middle:stop])


def _rank_memory(rank: int, budget: int, allowance: RankOffload, device: str, tokens: int) -> _RankMemory:
    if device == "cpu":
        # A CPU rank's own memory is its budget: it can offload only to disk.
        return _RankMemory("cpu", {"cpu": budget, "disk": allowance.get("disk", 0)}, tokens)
    tiers = {tier: allowance[tier] for tier in OFFLOAD_TIERS if tier in allowance}
    return _RankMemory(f"cuda:{rank}", {f"cuda:{rank}": budget, **tiers}, tokens)


def _local_plan(profile: Profile, units: list[Unit], group: range, memory: _RankMemory, workload: Workload) -> Plan:
    names = {block.name for index in group for block in units[index].blocks}
    stage = replace(profile, blocks=tuple(block for block in profile.blocks if block.name in names), tied=())
    return make_plan(stage, memory.budgets, workload, "auto")


def _split_ranks(
    units: list[Unit], step_bytes: list[int], memories: list[_RankMemory], high: int
) -> list[range] | None:
    """One non-empty run per rank, its slowest rank reading the fewest (weighted) bytes per step; None if none fits."""

    def split_within(limit: int) -> list[range] | None:
        return pack(len(units), [partial(_RankRun, units, step_bytes, memory, limit) for memory in memories], 1)

    return smallest_limit(split_within, max(step_bytes), high)


class _RankRun:
    """A rank's run from ``start``: takes each next unit while the rank can place the run within ``limit``."""

    def __init__(self, units: list[Unit], step_bytes: list[int], memory: _RankMemory, limit: int, start: int):
        self.units, self.step_bytes, self.memory, self.limit, self.start = units, step_bytes, memory, limit, start
        self.load = DeviceLoad(memory.budgets[memory.compute], memory.tokens)
        self.reads, self.overflowed = 0, False

    def __call__(self, index: int) -> bool:
        # While the run fits the device the running ledger decides cheaply; once it does
        # not (and a run only grows), the planner's split says what is offloaded.
        self.overflowed = self.overflowed or not self.load.take(self.units[index], self.memory.tokens)
        if self.overflowed:
            reads = self.memory.weighted_reads(self.units, self.step_bytes, self.start, index + 1)
        else:
            reads = self.reads + self.step_bytes[index]
        if reads is None or reads > self.limit:
            return False
        self.reads = reads
        return True


def _stage(rank: int, plan: Plan, device: str, budget: int) -> Stage:
    """What a rank computing on ``device`` holds under ``plan``, and what it keeps on its CPU memory or disk."""
    row = next(row for row in plan.ledger if row.device == device)
    sizes = {block.name: block.weight_bytes for block in plan.profile.blocks}
    offloaded = tuple((p.block, p.device) for p in plan.offloaded() if p.execution_device == device)
    return Stage(
        rank=rank,
        blocks=tuple(p.block for p in plan.placements if p.execution_device == device),
        weight_bytes=row.weight_bytes + row.buffer_bytes,
        kv_bytes=row.kv_bytes,
        activation_bytes=row.activation_bytes,
        budget_bytes=budget,
        stream_bytes=row.stream_bytes,
        offloaded=offloaded,
        offloaded_bytes=sum(sizes[block] for block, _ in offloaded),
    )


def _offloading_stage_plan(
    profile: Profile, workload: Workload, local_plans: list[Plan], rank_budgets: Sequence[int]
) -> StagePlan:
    """Stages from each rank's own plan: what its device holds, and what its CPU memory or disk keeps."""
    computing = [local.placements[0].execution_device for local in local_plans]
    ranks = enumerate(zip(local_plans, computing, rank_budgets))
    stages = tuple(_stage(rank, local, device, budget) for rank, (local, device, budget) in ranks)
    reasons = [
        f"no split fits the ranks' budgets, so ranks keep the tail of their stage on their own CPU memory or "
        f"disk; stages balance decode reads with offloaded blocks counted {OFFLOADED_READ_WEIGHT}× (read from "
        "a slower tier at every step)"
    ]
    reasons += [
        f"rank {stage.rank} keeps {len(stage.offloaded)} of its {len(stage.blocks)} blocks "
        f"({format_size(stage.offloaded_bytes)}, from {stage.offloaded[0][0]}) on "
        f"{' then '.join(dict.fromkeys(tier for _, tier in stage.offloaded))}, computing them on its {device}"
        for stage, device in zip(stages, computing)
        if stage.offloaded
    ]
    return StagePlan(profile, workload, stages, tuple(reasons))


def _capacity_reason(plan: Plan) -> str:
    capacity = plan.kv_token_capacity
    if capacity == float("inf"):
        return "nothing is cached per token; the budgets bound only weights and activations"
    return (
        f"{capacity:,.0f} batch×tokens of KV cache fit before the first rank runs out "
        f"({capacity / (plan.workload.batch_size * plan.workload.max_tokens):.2f}× the workload)"
    )


def parse_rank_budgets(max_memory: RankBudgets | None, stages: int) -> dict[int, int]:
    """Budgets in bytes for the ranks ``max_memory`` names: a list per rank, a dict, or "0=2GiB,1=4GiB".

    >>> parse_rank_budgets("0=1GiB,1=500MB", 2)
    {0: 1073741824, 1: 500000000}
    """
    if max_memory is None:
        return {}
    if isinstance(max_memory, str):
        max_memory = dict(split_assignments(max_memory, key="RANK", example="0=8GiB,1=8GiB"))
    if not isinstance(max_memory, Mapping):
        max_memory = dict(enumerate(max_memory))
    budgets = {_rank_of(key, stages): parse_size(size) for key, size in max_memory.items()}
    return dict(sorted(budgets.items()))


def _rank_of(key: int | str, stages: int) -> int:
    text = str(key).strip()
    if not text.isdigit() or int(text) >= stages:
        raise PipelineError(
            f"max_memory names {key!r}, which is not a rank of this {stages}-stage pipeline; "
            f"name ranks 0 to {stages - 1}, e.g. '0=8GiB,1=8GiB'"
        )
    return int(text)


def _copy_tied_weights(profile: Profile) -> Profile:
    """Count a tied tensor on every block that uses it, and drop the ties, so they may split.

    The shared tensor is counted in the first block of a tie (an embedding, whose block
    holds just that tensor), so each later block of the tie is charged that block's bytes.
    """
    order = {block.name: index for index, block in enumerate(profile.blocks)}
    by_name = {block.name: block for block in profile.blocks}
    copied: dict[str, int] = {}
    for group in profile.tied:
        first, *others = sorted(group, key=order.__getitem__)
        for name in others:
            copied[name] = copied.get(name, 0) + by_name[first].weight_bytes
    blocks = tuple(
        replace(block, weight_bytes=block.weight_bytes + copied.get(block.name, 0)) for block in profile.blocks
    )
    return replace(profile, blocks=blocks, tied=())


def _does_not_fit(
    profile: Profile, rank_budgets: Sequence[int], workload: Workload, offload: Sequence[RankOffload] | None
) -> DoesNotFitError:
    total = DeviceLoad(0, workload.batch_size * workload.max_tokens)
    total.place(*price_units(profile, workload))
    budgets = describe_budgets({f"rank {rank}": budget for rank, budget in enumerate(rank_budgets)})
    return DoesNotFitError(
        f"{profile.name} needs {format_size(total.used_bytes())} (weights, KV cache and activations, tied "
        f"weights counted on each stage that uses them) for {workload.batch_size} × {workload.max_tokens}-token "
        f"sequences, but the {len(rank_budgets)} ranks' budgets ({budgets}) add up to "
        f"{format_size(sum(rank_budgets))} and no contiguous split fits{_offload_note(offload)}; give the ranks "
        "more memory, use more stages, or a smaller workload or dtype"
    )


def _offload_note(offload: Sequence[RankOffload] | None) -> str:
    if offload is None:
        return ", and offload is off"
    allowances = ", ".join(
        f"rank {rank} " + (" and ".join(f"{tier} {format_size(size)}" for tier, size in allowance.items()) or "none")
        for rank, allowance in enumerate(offload)
    )
    return f", even offloading the tail of a stage ({allowances})"


def _rank_device(rank: int) -> str:
    # The planner plans over named computing devices; each rank stands in as one.
    return f"cuda:{rank}"
