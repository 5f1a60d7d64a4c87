"""Pipeline stages: the contiguous run of blocks each rank holds.

Every rank is one computing device with its own budget, and must hold its blocks'
weights with the workload's KV cache and activations, priced by the planner's own
ledger. A pipeline runs as fast as its slowest stage, so among the splits that fit, the
one whose slowest stage reads the fewest bytes per decode step wins: an output head is
as costly as several layers, an embedding lookup costs almost nothing. Weights tied
across stages (an embedding reused as the head) are held by both stages that use them.
Only when no split fits the ranks' budgets may a rank offload the tail of its stage to
its own CPU memory or disk (``stage_offload``).
"""

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from rich.console import Console
from rich.table import Table

from ..errors import DoesNotFitError, PipelineError
from ..model.profile import Profile
from ..units import format_size, parse_size
from ..workload import Workload
from .ledger import DeviceLoad, Unit, price_units
from .plan import Placement, Plan
from .stage_offload import OFFLOADED_READ_WEIGHT, RankOffload, describe_allowances, smallest_limit, split_offloading

RankBudgets = Mapping[int | str, int | str] | Sequence[int | str] | str


@dataclass(frozen=True)
class Stage:
    """One rank's share of the model and what it must hold, in bytes, for the workload.

    ``weight_bytes`` are kept on the rank's device; ``offloaded`` are (block, "cpu" or
    "disk") pairs, ``offloaded_bytes`` in all, kept in the rank's host memory or on its
    disk and brought to the device through ``stream_bytes`` of room there when they run.
    """

    rank: int
    blocks: tuple[str, ...]
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    budget_bytes: int
    stream_bytes: int = 0
    offloaded: tuple[tuple[str, str], ...] = ()
    offloaded_bytes: int = 0

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes + self.stream_bytes

    def offload_summary(self) -> str:
        """How much of the stage is offloaded and where, e.g. "4 blocks, 54.0 MiB on disk"; "—" when none."""
        if not self.offloaded:
            return "—"
        tiers = dict.fromkeys(tier for _, tier in self.offloaded)
        noun = "block" if len(self.offloaded) == 1 else "blocks"
        return f"{len(self.offloaded)} {noun}, {format_size(self.offloaded_bytes)} on {' then '.join(tiers)}"

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    def span(self) -> str:
        """The first and last block, e.g. "model.embed_tokens … model.layers.14"."""
        if len(self.blocks) == 1:
            return self.blocks[0]
        return f"{self.blocks[0]} … {self.blocks[-1]}"


@dataclass(frozen=True)
class StagePlan:
    """The stages of a pipeline over ranks, with the workload and reasons behind them.

    >>> plan = split_stages(profile, [2 * 2**30, 4 * 2**30])  # doctest: +SKIP
    >>> plan.stages[1].blocks[-1]  # doctest: +SKIP
    'lm_head'
    """

    profile: Profile
    workload: Workload
    stages: tuple[Stage, ...]
    reasons: tuple[str, ...] = ()

    def blocks_of(self, rank: int) -> tuple[str, ...]:
        return self.stages[rank].blocks

    def table(self) -> Table:
        """One row per rank: its blocks and its ledger."""
        table = Table(title=f"{self.profile.name} · {self.profile.dtype} · pipeline of {len(self.stages)} stages")
        offloading = any(stage.offloaded for stage in self.stages)
        columns = ("rank", "blocks", "count", "weights", "KV cache", "activations")
        columns += ("streaming", "offloaded") if offloading else ()
        for column in (*columns, "budget", "free"):
            table.add_column(column, justify="left" if column in ("rank", "blocks") else "right")
        for stage in self.stages:
            sizes = (stage.weight_bytes, stage.kv_bytes, stage.activation_bytes)
            offload = (format_size(stage.stream_bytes), stage.offload_summary()) if offloading else ()
            table.add_row(
                str(stage.rank),
                stage.span(),
                str(len(stage.blocks)),
                *(format_size(size) for size in sizes),
                *offload,
                format_size(stage.budget_bytes),
                format_size(stage.free_bytes),
            )
        return table

    def __str__(self) -> str:
        # Offloading adds two columns; a wider page keeps each rank on one line.
        width = 150 if any(stage.offloaded for stage in self.stages) else 120
        console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
        console.print(self.table())
        workload = self.workload
        console.print(f"workload: batch {workload.batch_size} × {workload.max_tokens} tokens, KV cache in "
                      f"{workload.kv_dtype}", highlight=False)
        for reason in self.reasons:
            console.print(f"- {reason}", highlight=False, soft_wrap=True)
        return console.file.getvalue().rstrip()


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
    per decode step is chosen exactly (binary search on that limit, each rank in turn
    taking the longest run that fits under it while leaving a block for every later rank).

    When no split fits, ``offload`` (per rank, bytes it may keep on "cpu" and "disk"; a
    ``device="cpu"`` rank computes in its CPU budget and offloads to disk only) lets ranks
    keep the tail of their stage there, as ``stage_offload`` explains.

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
    workload = (workload or Workload()).resolve(staged.max_context, staged.dtype)
    units = price_units(staged, workload)
    step_bytes = [_step_bytes(unit, index, workload) for index, unit in enumerate(units)]
    groups = _balance(units, step_bytes, rank_budgets, workload)
    if groups is None and offload is not None:
        local_plans = split_offloading(staged, units, step_bytes, rank_budgets, workload, offload, device)
        if local_plans is not None:
            return _offloading_stage_plan(staged, workload, local_plans, rank_budgets)
    if groups is None:
        raise _does_not_fit(staged, rank_budgets, workload, offload)
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
    plan = Plan(staged, workload, budgets, "pipeline", placements, (reason,))
    return StagePlan(staged, workload, _stages(plan, rank_budgets), plan.reasons + (_capacity_reason(plan),))


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


def _balance(units: list[Unit], step_bytes: list[int], rank_budgets: Sequence[int], workload: Workload):
    """Index groups, one per rank, minimising the largest group's step bytes; None if none fits."""
    tokens = workload.batch_size * workload.max_tokens
    return smallest_limit(
        lambda limit: _pack(units, step_bytes, rank_budgets, tokens, limit), max(step_bytes), sum(step_bytes)
    )


def _pack(units, step_bytes, rank_budgets, tokens, limit) -> list[list[int]] | None:
    """Each rank in turn takes the longest run within its budget and ``limit``, leaving one unit per later rank."""
    groups, index = [], 0
    for rank, budget in enumerate(rank_budgets):
        later_ranks = len(rank_budgets) - rank - 1
        load, group, read = DeviceLoad(budget, tokens), [], 0
        while (
            index < len(units) - later_ranks
            and (not group or read + step_bytes[index] <= limit)
            and load.would_fit(units[index], tokens)
        ):
            load.store(units[index])
            load.execute(units[index])
            read += step_bytes[index]
            group.append(index)
            index += 1
        if not group or read > limit:
            return None
        groups.append(group)
    return groups if index == len(units) else None


def _stages(plan: Plan, rank_budgets: Sequence[int]) -> tuple[Stage, ...]:
    rows = {row.device: row for row in plan.ledger}
    return tuple(
        Stage(
            rank=rank,
            blocks=tuple(p.block for p in plan.placements if p.device == _rank_device(rank)),
            weight_bytes=rows[_rank_device(rank)].weight_bytes + rows[_rank_device(rank)].buffer_bytes,
            kv_bytes=rows[_rank_device(rank)].kv_bytes,
            activation_bytes=rows[_rank_device(rank)].activation_bytes,
            budget_bytes=budget,
        )
        for rank, budget in enumerate(rank_budgets)
    )


def _offloading_stage_plan(
    profile: Profile, workload: Workload, local_plans: list[Plan], rank_budgets: Sequence[int]
) -> StagePlan:
    """Stages from each rank's own plan: what its device holds, and what its CPU memory or disk keeps."""
    stages, reasons = [], [
        f"no split fits the ranks' budgets, so ranks keep the tail of their stage on their own CPU memory or "
        f"disk; stages balance decode reads with offloaded blocks counted {OFFLOADED_READ_WEIGHT}× (read from "
        "a slower tier at every step)"
    ]
    for rank, (local, budget) in enumerate(zip(local_plans, rank_budgets)):
        compute = local.placements[0].execution_device
        row = next(row for row in local.ledger if row.device == compute)
        sizes = {block.name: block.weight_bytes for block in local.profile.blocks}
        offloaded = tuple((p.block, p.device) for p in local.offloaded())
        stages.append(
            Stage(
                rank=rank,
                blocks=tuple(block.name for block in local.profile.blocks),
                weight_bytes=row.weight_bytes + row.buffer_bytes,
                kv_bytes=row.kv_bytes,
                activation_bytes=row.activation_bytes,
                budget_bytes=budget,
                stream_bytes=row.stream_bytes,
                offloaded=offloaded,
                offloaded_bytes=sum(sizes[block] for block, _ in offloaded),
            )
        )
        if offloaded:
            reasons.append(
                f"rank {rank} keeps {len(offloaded)} of its {len(local.placements)} blocks "
                f"({format_size(stages[-1].offloaded_bytes)}, from {offloaded[0][0]}) on "
                f"{' then '.join(dict.fromkeys(tier for _, tier in offloaded))}, computing them on its {compute}"
            )
    return StagePlan(profile, workload, tuple(stages), tuple(reasons))


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
        max_memory = dict(_split_assignment(part) for part in max_memory.split(",") if part.strip())
    if not isinstance(max_memory, Mapping):
        max_memory = dict(enumerate(max_memory))
    budgets = {}
    for key, size in max_memory.items():
        rank = _rank_of(key, stages)
        budgets[rank] = parse_size(size)
    return dict(sorted(budgets.items()))


def _rank_of(key: int | str, stages: int) -> int:
    text = str(key).strip()
    if not text.isdigit() or int(text) >= stages:
        raise PipelineError(
            f"max_memory names {key!r}, which is not a rank of this {stages}-stage pipeline; "
            f"name ranks 0 to {stages - 1}, e.g. '0=8GiB,1=8GiB'"
        )
    return int(text)


def _split_assignment(part: str) -> tuple[str, str]:
    rank, sep, size = part.partition("=")
    if not sep or not rank.strip() or not size.strip():
        raise PipelineError(f"max_memory entry {part.strip()!r} is not RANK=SIZE; write e.g. '0=8GiB,1=8GiB'")
    return rank.strip(), size.strip()


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
    for unit in price_units(profile, workload):
        total.store(unit)
        total.execute(unit)
    return DoesNotFitError(
        f"{profile.name} needs {format_size(total.used_bytes())} (weights, KV cache and activations, tied "
        f"weights counted on each stage that uses them) for {workload.batch_size} × {workload.max_tokens}-token "
        f"sequences, but the {len(rank_budgets)} ranks' budgets ({_describe(rank_budgets)}) add up to "
        f"{format_size(sum(rank_budgets))} and no contiguous split fits{_offload_note(offload)}; give the ranks "
        "more memory, use more stages, or a smaller workload or dtype"
    )


def _offload_note(offload: Sequence[RankOffload] | None) -> str:
    if offload is None:
        return ", and offload is off"
    return f", even offloading the tail of a stage ({describe_allowances(offload)})"


def _rank_device(rank: int) -> str:
    # The planner plans over named computing devices; each rank stands in as one.
    return f"cuda:{rank}"


def _describe(rank_budgets: Sequence[int]) -> str:
    return ", ".join(f"rank {rank} {format_size(budget)}" for rank, budget in enumerate(rank_budgets))
