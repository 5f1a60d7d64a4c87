"""Pipeline stages: the contiguous run of blocks each rank holds, from the same exact planner.

Every rank is one computing device with its own budget. The planner's balanced strategy
splits the model into one contiguous run per rank, maximising the batch × tokens of KV
cache that fit before any rank runs out, with each rank's KV cache and activations
reserved for the workload. Weights tied across stages (an embedding reused as the
output head) are held by each stage that computes with them, so they are counted on both.
"""

import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from rich.console import Console
from rich.table import Table

from .errors import DoesNotFitError, PipelineError
from .ledger import DeviceLoad, price_units
from .planner import make_plan
from .profile import Profile
from .units import format_size, parse_size
from .workload import Workload

RankBudgets = Mapping[int | str, int | str] | Sequence[int | str] | str


@dataclass(frozen=True)
class Stage:
    """One rank's share of the model and what it must hold, in bytes, for the workload."""

    rank: int
    blocks: tuple[str, ...]
    weight_bytes: int
    kv_bytes: int
    activation_bytes: int
    budget_bytes: int

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes

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
        for column in ("rank", "blocks", "count", "weights", "KV cache", "activations", "budget", "free"):
            table.add_column(column, justify="left" if column in ("rank", "blocks") else "right")
        for stage in self.stages:
            table.add_row(
                str(stage.rank),
                stage.span(),
                str(len(stage.blocks)),
                *(format_size(size) for size in (stage.weight_bytes, stage.kv_bytes, stage.activation_bytes)),
                format_size(stage.budget_bytes),
                format_size(stage.free_bytes),
            )
        return table

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=120, color_system=None, force_terminal=False)
        console.print(self.table())
        workload = self.workload
        console.print(f"workload: batch {workload.batch_size} × {workload.max_tokens} tokens, KV cache in "
                      f"{workload.kv_dtype}", highlight=False)
        for reason in self.reasons:
            console.print(f"- {reason}", highlight=False, soft_wrap=True)
        return console.file.getvalue().rstrip()


def split_stages(profile: Profile, rank_budgets: Sequence[int], workload: Workload | None = None) -> StagePlan:
    """Split ``profile`` into one contiguous stage per rank; pure, like the planner.

    ``rank_budgets`` are bytes per rank, in rank order.

    >>> from devicemap.profile import Block, Profile
    >>> toy = Profile("toy", "float32", tuple(Block(f"layers.{i}", 10) for i in range(6)))
    >>> [stage.blocks for stage in split_stages(toy, [40, 20]).stages]
    [('layers.0', 'layers.1', 'layers.2', 'layers.3'), ('layers.4', 'layers.5')]
    """
    if len(rank_budgets) < 1:
        raise PipelineError("a pipeline needs at least one rank; give one budget per rank")
    staged = _copy_tied_weights(profile) if len(rank_budgets) > 1 else profile
    budgets = {_rank_device(rank): budget for rank, budget in enumerate(rank_budgets)}
    try:
        plan = make_plan(staged, budgets, workload, "balanced", offload=False)
    except DoesNotFitError:
        raise _does_not_fit(staged, rank_budgets, workload) from None
    rows = {row.device: row for row in plan.ledger}
    stages = tuple(
        Stage(
            rank=rank,
            blocks=tuple(p.block for p in plan.placements if p.device == _rank_device(rank)),
            weight_bytes=rows[_rank_device(rank)].weight_bytes + rows[_rank_device(rank)].buffer_bytes,
            kv_bytes=rows[_rank_device(rank)].kv_bytes,
            activation_bytes=rows[_rank_device(rank)].activation_bytes,
            budget_bytes=budgets[_rank_device(rank)],
        )
        for rank in range(len(rank_budgets))
    )
    idle = [stage.rank for stage in stages if not stage.blocks]
    if idle:
        raise PipelineError(
            f"rank(s) {', '.join(map(str, idle))} would hold no block of {profile.name} "
            f"({len(profile.blocks)} blocks over {len(rank_budgets)} ranks with budgets "
            f"{_describe(rank_budgets)}); use fewer stages or give those ranks more memory"
        )
    return StagePlan(staged, plan.workload, stages, tuple(_in_rank_terms(reason) for reason in plan.reasons))


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
    blocks = tuple(replace(block, weight_bytes=block.weight_bytes + copied.get(block.name, 0)) for block in profile.blocks)
    return replace(profile, blocks=blocks, tied=())


def _does_not_fit(profile: Profile, rank_budgets: Sequence[int], workload: Workload | None) -> DoesNotFitError:
    workload = (workload or Workload()).resolve(profile.max_context, profile.dtype)
    total = DeviceLoad(0, workload.batch_size * workload.max_tokens)
    for unit in price_units(profile, workload):
        total.store(unit)
        total.execute(unit)
    return DoesNotFitError(
        f"{profile.name} needs {format_size(total.used_bytes())} (weights, KV cache and activations, tied "
        f"weights counted on each stage that uses them) for {workload.batch_size} × {workload.max_tokens}-token "
        f"sequences, but the {len(rank_budgets)} ranks' budgets ({_describe(rank_budgets)}) add up to "
        f"{format_size(sum(rank_budgets))} and no contiguous split fits; give the ranks more memory, use more "
        "stages, or a smaller workload or dtype"
    )


def _rank_device(rank: int) -> str:
    # The planner plans over named computing devices; each rank stands in as one.
    return f"cuda:{rank}"


def _in_rank_terms(text: str) -> str:
    return re.sub(r"cuda:(\d+)", r"rank \1", text)


def _describe(rank_budgets: Sequence[int]) -> str:
    return ", ".join(f"rank {rank} {format_size(budget)}" for rank, budget in enumerate(rank_budgets))
