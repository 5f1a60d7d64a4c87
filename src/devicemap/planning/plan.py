"""Plans and their ledgers: where every block lives and computes, or each pipeline rank's stage."""

import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

from rich.console import Console
from rich.table import Table

from ..devices import device_order
from ..model.profile import Block, Profile
from ..units import format_size
from ..workload import Workload
from .ledger import DeviceLoad, assign, prefill_tokens, price_units


@dataclass(frozen=True)
class Placement:
    """Where one block's weights are kept, and where it computes.

    ``device`` is an accelerator, "cpu" or "disk"; ``execution_device`` equals it for
    accelerators, and for offloaded blocks names the device their weights stream to.
    """

    block: str
    device: str
    execution_device: str


@dataclass(frozen=True)
class DeviceLedger:
    """What one device holds under a plan, in bytes, for the plan's workload.

    ``runtime_bytes`` is the runtime reserve a GPU that computes keeps beside the tensors.
    """

    device: str
    blocks: int
    weight_bytes: int
    buffer_bytes: int
    kv_bytes: int
    activation_bytes: int
    stream_bytes: int
    runtime_bytes: int
    budget_bytes: int
    kv_token_capacity: float

    @property
    def used_bytes(self) -> int:
        """What the plan's tensors take here: what ``torch.cuda.max_memory_allocated`` measures on a GPU."""
        return self.weight_bytes + self.buffer_bytes + self.kv_bytes + self.activation_bytes + self.stream_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes - self.runtime_bytes


@dataclass(frozen=True)
class Plan:
    """A device map with the budgets, workload and reasons that produced it (see ``planner.make_plan``).

    ``runtime_reserves`` are the bytes each device keeps, when it computes, for the runtime
    beside the tensors (a CUDA context's kernels, cuBLAS workspaces, the allocator's rounding).
    """

    profile: Profile
    workload: Workload
    budgets: tuple[tuple[str, int], ...]
    strategy: str
    placements: tuple[Placement, ...]
    reasons: tuple[str, ...] = ()
    runtime_reserves: tuple[tuple[str, int], ...] = ()

    @cached_property
    def device_map(self) -> dict[str, int | str]:
        """Module-name prefixes to devices, the shortest that cover every tensor, for transformers."""
        device_of = {placement.block: placement.device for placement in self.placements}
        leaves = [(name, device_of[block.name]) for block in self.profile.blocks for name in _leaves(block)]
        return {prefix: _transformers_device(device) for prefix, device in _shortest_prefixes(leaves)}

    @cached_property
    def ledger(self) -> tuple[DeviceLedger, ...]:
        """One row per device with a budget or a block, in device order."""
        tokens = self.workload.batch_size * self.workload.max_tokens
        budgets, reserves = dict(self.budgets), dict(self.runtime_reserves)
        devices = sorted({*budgets, *(p.device for p in self.placements)}, key=device_order)
        loads = {device: DeviceLoad(budgets.get(device, 0), tokens, reserves.get(device, 0)) for device in devices}
        placement = {p.block: p for p in self.placements}
        for unit in price_units(self.profile, self.workload):
            assign(loads, unit, placement[unit.name].device, placement[unit.name].execution_device)
        counts = {device: 0 for device in devices}
        for p in self.placements:
            counts[p.device] += 1
        return tuple(_ledger_row(device, counts[device], loads[device]) for device in devices)

    @property
    def kv_token_capacity(self) -> float:
        """Batch×tokens of KV cache that fit before the first computing device runs out."""
        computing = {p.execution_device for p in self.placements}
        return min(row.kv_token_capacity for row in self.ledger if row.device in computing)

    @property
    def prefill_chunk(self) -> int | None:
        """Prompt tokens per sequence in one prefill forward that the plan reserved for; ``None``: whole prompts."""
        chunk = prefill_tokens(self.profile, self.workload)
        return chunk if chunk < self.workload.max_tokens else None

    @property
    def sequences_that_fit(self) -> float:
        """How many sequences of the workload's length fit at once."""
        return self.kv_token_capacity / self.workload.max_tokens

    def offloaded(self) -> tuple[Placement, ...]:
        """Placements whose weights are not kept where they compute."""
        return tuple(p for p in self.placements if p.device != p.execution_device)

    def __str__(self) -> str:
        return _render(self.table(), self.summary(), width=150)

    def table(self) -> Table:
        """The per-device ledger as a rich table."""
        columns = ("device", "blocks", "holds", "weights", "buffers", "KV cache", "activations", "streaming", "runtime",
                   "budget", "free")  # fmt: skip
        rows = [
            (row.device, str(row.blocks), describe_blocks([p.block for p in self.placements if p.device == row.device]),
             *map(format_size, (row.weight_bytes, row.buffer_bytes, row.kv_bytes, row.activation_bytes,
                                row.stream_bytes, row.runtime_bytes, row.budget_bytes, row.free_bytes)))
            for row in self.ledger
        ]  # fmt: skip
        title = f"{self.profile.name} · {self.profile.dtype} · {self.strategy}"
        return _ledger_table(title, columns, rows, left=("device", "holds"))

    def summary(self) -> list[str]:
        """Lines under the table: the workload, how much more fits, and why."""
        workload = self.workload
        capacity = self.kv_token_capacity
        lines = [_workload_line(workload, self.prefill_chunk)]
        if capacity == float("inf"):
            lines.append("no per-token KV cache: the sequence length is bounded by activations only")
        else:
            lines.append(
                f"fits {self.sequences_that_fit:.1f} × {workload.max_tokens}-token sequences "
                f"({math.floor(capacity):,} batch × tokens of KV cache)"
            )
        return lines + [f"- {reason}" for reason in self.reasons]

    def to_json(self) -> str:
        """The whole plan, profile included, as JSON that :meth:`from_json` reads back."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        data = json.loads(text)
        profile = data["profile"]
        blocks = tuple(
            Block(**{**block, "tensor_names": tuple(block["tensor_names"])}) for block in profile["blocks"]
        )
        return cls(
            profile=Profile(
                **{
                    **profile,
                    "blocks": blocks,
                    "tied": tuple(tuple(group) for group in profile["tied"]),
                    "module_names": tuple(profile["module_names"]),
                }
            ),
            workload=Workload(**data["workload"]),
            budgets=tuple((device, size) for device, size in data["budgets"]),
            strategy=data["strategy"],
            placements=tuple(Placement(**p) for p in data["placements"]),
            reasons=tuple(data["reasons"]),
            # Plans saved before runtime reserves were planned kept none.
            runtime_reserves=tuple((device, size) for device, size in data.get("runtime_reserves", ())),
        )


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
    """The stages of a pipeline over ranks, with the workload and reasons behind them (see ``stages.split_stages``)."""

    profile: Profile
    workload: Workload
    stages: tuple[Stage, ...]
    reasons: tuple[str, ...] = ()

    def blocks_of(self, rank: int) -> tuple[str, ...]:
        return self.stages[rank].blocks

    def table(self) -> Table:
        """One row per rank: its blocks and its ledger."""
        offloading = any(stage.offloaded for stage in self.stages)
        columns = ("rank", "blocks", "count", "weights", "KV cache", "activations")
        columns += ("streaming", "offloaded") if offloading else ()
        rows = [
            (str(stage.rank), stage.span(), str(len(stage.blocks)),
             *map(format_size, (stage.weight_bytes, stage.kv_bytes, stage.activation_bytes)),
             *((format_size(stage.stream_bytes), stage.offload_summary()) if offloading else ()),
             format_size(stage.budget_bytes), format_size(stage.free_bytes))
            for stage in self.stages
        ]  # fmt: skip
        title = f"{self.profile.name} · {self.profile.dtype} · pipeline of {len(self.stages)} stages"
        return _ledger_table(title, (*columns, "budget", "free"), rows, left=("rank", "blocks"))

    def __str__(self) -> str:
        # Offloading adds two columns; a wider page keeps each rank on one line.
        width = 150 if any(stage.offloaded for stage in self.stages) else 120
        lines = [_workload_line(self.workload, None), *(f"- {reason}" for reason in self.reasons)]
        return _render(self.table(), lines, width)


def _ledger_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], left: Sequence[str]) -> Table:
    """Ledger rows as a rich table: the ``left`` columns name things, the others are numbers."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _render(table: Table, lines: Iterable[str], width: int = 120) -> str:
    """The table and the lines under it as plain text, ``width`` characters wide."""
    console = Console(file=io.StringIO(), width=width, color_system=None, force_terminal=False)
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)
    return console.file.getvalue().rstrip()


def _workload_line(workload: Workload, prefill_chunk: int | None) -> str:
    prefill = f"prefill in chunks of {prefill_chunk:,} tokens" if prefill_chunk else "prefill whole"
    return (
        f"workload: batch {workload.batch_size} × {workload.max_tokens} tokens, KV cache in {workload.kv_dtype}, "
        f"{prefill}"
    )


def describe_blocks(names: list[str]) -> str:
    """Block names in short, numbered runs collapsed, in the order given.

    >>> describe_blocks(["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "lm_head"])
    'embed_tokens, layers 0-2, lm_head'
    """
    runs: list[tuple[str, int | None, int | None]] = []  # (name, first, last number), None when not numbered
    for name in names:
        *path, last = name.split(".")
        if not (path and last.isdigit()):
            runs.append((last, None, None))
        elif runs and runs[-1][0] == path[-1] and runs[-1][2] == int(last) - 1:
            runs[-1] = (path[-1], runs[-1][1], int(last))
        else:
            runs.append((path[-1], int(last), int(last)))
    return ", ".join(_describe_run(*run) for run in runs) or "—"


def _describe_run(name: str, first: int | None, last: int | None) -> str:
    if first is None:
        return name
    return f"{name} {first}" if first == last else f"{name} {first}-{last}"


def _ledger_row(device: str, blocks: int, load: DeviceLoad) -> DeviceLedger:
    return DeviceLedger(
        device=device,
        blocks=blocks,
        weight_bytes=load.weight_bytes,
        buffer_bytes=load.buffer_bytes,
        kv_bytes=load.kv_bytes(),
        activation_bytes=load.activation_bytes,
        stream_bytes=load.stream_bytes,
        runtime_bytes=load.runtime_bytes,
        budget_bytes=load.budget_bytes,
        kv_token_capacity=load.token_capacity(),
    )


def _leaves(block: Block) -> tuple[str, ...]:
    return block.tensor_names or (block.name,)


def _shortest_prefixes(leaves: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Collapse dotted names to the shortest prefixes whose leaves all share one device."""
    tree: dict = {}
    for name, device in leaves:
        node = tree
        for part in name.split("."):
            node = node.setdefault(part, {})
        node[None] = device
    out: list[tuple[str, str]] = []
    _collapse(tree, "", out)
    return out


def _collapse(node: dict, prefix: str, out: list) -> set[str]:
    devices = _devices_below(node)
    if len(devices) == 1:
        out.append((prefix, next(iter(devices))))
        return devices
    for part, child in node.items():
        if part is not None:
            _collapse(child, f"{prefix}.{part}" if prefix else part, out)
    return devices


def _devices_below(node: dict) -> set[str]:
    found = set()
    for part, child in node.items():
        found |= {child} if part is None else _devices_below(child)
    return found


def _transformers_device(device: str) -> int | str:
    return int(device[5:]) if device.startswith("cuda:") else device
