"""Plan: where every block lives and computes, and the per-device ledger derived from that."""

import io
import json
import math
from dataclasses import asdict, dataclass
from functools import cached_property

from rich.console import Console
from rich.table import Table

from ..devices import device_order
from ..model.profile import Block, Profile
from ..units import format_size
from ..workload import Workload
from .ledger import DeviceLoad, assign, price_units


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
    """What one device holds under a plan, in bytes, for the plan's workload."""

    device: str
    blocks: int
    weight_bytes: int
    buffer_bytes: int
    kv_bytes: int
    activation_bytes: int
    stream_bytes: int
    budget_bytes: int
    kv_token_capacity: float

    @property
    def used_bytes(self) -> int:
        return self.weight_bytes + self.buffer_bytes + self.kv_bytes + self.activation_bytes + self.stream_bytes

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes


@dataclass(frozen=True)
class Plan:
    """A device map with the budgets, workload and reasons that produced it.

    >>> plan = devicemap.plan("config.json", max_memory={0: "24GiB", 1: "24GiB"})  # doctest: +SKIP
    >>> plan.device_map  # doctest: +SKIP
    {'model.embed_tokens': 0, 'model.layers.0': 0, ..., 'lm_head': 1}
    """

    profile: Profile
    workload: Workload
    budgets: tuple[tuple[str, int], ...]
    strategy: str
    placements: tuple[Placement, ...]
    reasons: tuple[str, ...] = ()

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
        budgets = dict(self.budgets)
        devices = sorted({*budgets, *(p.device for p in self.placements)}, key=device_order)
        loads = {device: DeviceLoad(budgets.get(device, 0), tokens) for device in devices}
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
    def sequences_that_fit(self) -> float:
        """How many sequences of the workload's length fit at once."""
        return self.kv_token_capacity / self.workload.max_tokens

    def offloaded(self) -> tuple[Placement, ...]:
        """Placements whose weights are not kept where they compute."""
        return tuple(p for p in self.placements if p.device != p.execution_device)

    def __str__(self) -> str:
        console = Console(file=io.StringIO(), width=150, color_system=None, force_terminal=False)
        console.print(self.table())
        for line in self.summary():
            console.print(line, highlight=False, soft_wrap=True)
        return console.file.getvalue().rstrip()

    def table(self) -> Table:
        """The per-device ledger as a rich table."""
        table = Table(title=f"{self.profile.name} · {self.profile.dtype} · {self.strategy}")
        columns = ("device", "blocks", "holds", "weights", "buffers", "KV cache", "activations", "streaming", "budget", "free")
        for column in columns:
            table.add_column(column, justify="left" if column in ("device", "holds") else "right")
        for row in self.ledger:
            table.add_row(
                row.device,
                str(row.blocks),
                describe_blocks([p.block for p in self.placements if p.device == row.device]),
                *(format_size(size) for size in (row.weight_bytes, row.buffer_bytes, row.kv_bytes)),
                *(format_size(size) for size in (row.activation_bytes, row.stream_bytes, row.budget_bytes)),
                format_size(row.free_bytes),
            )
        return table

    def summary(self) -> list[str]:
        """Lines under the table: the workload, how much more fits, and why."""
        workload = self.workload
        capacity = self.kv_token_capacity
        lines = [
            f"workload: batch {workload.batch_size} × {workload.max_tokens} tokens, "
            f"KV cache in {workload.kv_dtype}"
        ]
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
