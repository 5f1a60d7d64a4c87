"""What plans are measured against: the best contiguous split, and transformers' own device maps.

The best split is found here by dynamic programming over every contiguous split, written
apart from devicemap's planner (a greedy packing under a binary search), so that the two
check each other. Both use devicemap's unit prices and ledger, so every map, transformers'
included, is judged by the same accounting of weights, reserves and KV room.
"""

import logging
import math
from dataclasses import dataclass

from torch import nn

from devicemap.devices import is_accelerator
from devicemap.model.profile import Profile
from devicemap.planning.ledger import Unit
from devicemap.planning.plan import Placement

STREAM_COPIES = 2  # an offloaded block computing while the next one arrives


@dataclass(frozen=True)
class Optimum:
    """The best contiguous split: how many units stay on the accelerators, and the KV room left."""

    resident_units: int
    kv_token_capacity: float

    @property
    def fits(self) -> bool:
        return self.resident_units >= 0


class _Run:
    """Running totals of a device computing a run of units (and maybe streaming offloaded ones)."""

    def __init__(self, streamed: tuple[Unit, ...]):
        self.fixed_bytes = sum(u.buffer_bytes + u.fixed_kv_bytes for u in streamed)
        self.fixed_bytes += STREAM_COPIES * max((u.weight_bytes for u in streamed), default=0)
        self.peak_bytes = max((u.transient_bytes for u in streamed), default=0)
        self.kv_bytes_per_token = sum(u.kv_bytes_per_token for u in streamed)
        self.busy = bool(streamed)

    def add(self, unit: Unit) -> None:
        self.fixed_bytes += unit.weight_bytes + unit.buffer_bytes + unit.fixed_kv_bytes
        self.peak_bytes = max(self.peak_bytes, unit.transient_bytes)
        self.kv_bytes_per_token += unit.kv_bytes_per_token
        self.busy = True

    def capacity(self, budget_bytes: int, tokens: int) -> float:
        """Batch×tokens of KV cache that fit; -inf when even the workload's ``tokens`` do not."""
        fixed = self.fixed_bytes + self.peak_bytes
        if not self.busy:
            return math.inf
        if fixed + self.kv_bytes_per_token * tokens > budget_bytes:
            return -math.inf
        return math.inf if self.kv_bytes_per_token == 0 else (budget_bytes - fixed) / self.kv_bytes_per_token


def best_split(units: list[Unit], budgets: dict[str, int], tokens: int, runtime_reserves: dict[str, int]) -> Optimum:
    """The split keeping the most leading units on the accelerators, then the most KV room.

    Units past the resident run are kept on CPU or disk and computed on the last accelerator.
    An accelerator that computes keeps its runtime reserve out of its budget; an idle one needs none.
    """
    gpus = [device for device in budgets if is_accelerator(device)]
    usable = {gpu: budgets[gpu] - runtime_reserves.get(gpu, 0) for gpu in gpus}
    offload_bytes = sum(size for device, size in budgets.items() if not is_accelerator(device))
    for resident in range(len(units), -1, -1):
        offloaded = tuple(units[resident:])
        if sum(u.weight_bytes for u in offloaded) > offload_bytes:
            break
        capacity = _best_capacity(units[:resident], offloaded, gpus, usable, tokens)
        if capacity >= tokens:
            return Optimum(resident, capacity)
    return Optimum(-1, 0.0)


def _best_capacity(resident, offloaded, gpus, budgets, tokens) -> float:
    """Max over contiguous splits of ``resident`` over ``gpus`` of the least KV room, by DP over prefixes."""
    best = [math.inf] + [-math.inf] * len(resident)
    for position, gpu in enumerate(gpus):
        streamed = offloaded if position == len(gpus) - 1 else ()
        best = [
            _best_ending_at(end, resident, streamed, best, budgets[gpu], tokens) for end in range(len(resident) + 1)
        ]
    return best[-1]


def _best_ending_at(end, resident, streamed, before, budget_bytes, tokens) -> float:
    run = _Run(streamed)
    value = min(before[end], run.capacity(budget_bytes, tokens))
    for start in range(end - 1, -1, -1):
        run.add(resident[start])
        value = max(value, min(before[start], run.capacity(budget_bytes, tokens)))
    return value


def transformers_device_map(model: nn.Module, strategy: str, budgets: dict[str, int]) -> dict:
    """The map ``from_pretrained(device_map=strategy, max_memory=...)`` would use, for a meta model."""
    from transformers.integrations.accelerate import _get_device_map

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    max_memory = {int(d[5:]) if d.startswith("cuda:") else d: size for d, size in budgets.items()}
    return _get_device_map(model, strategy, max_memory, None)


def placements_of(profile: Profile, device_map: dict) -> tuple[tuple[Placement, ...], int]:
    """devicemap placements for a transformers map, and how many blocks it splits across devices.

    Offloaded blocks compute on the map's first accelerator, as accelerate's dispatch runs them.
    A split block is charged to the device of its first tensor.
    """
    devices = [_device_name(value) for value in device_map.values()]
    executor = next((device for device in devices if is_accelerator(device)), "cpu")
    placements, split = [], 0
    for block in profile.blocks:
        found = [_device_name(_lookup(name, device_map)) for name in block.tensor_names or (block.name,)]
        split += len(set(found)) > 1
        placements.append(Placement(block.name, found[0], found[0] if is_accelerator(found[0]) else executor))
    return tuple(placements), split


def _lookup(name: str, device_map: dict):
    prefix = name
    while prefix not in device_map:
        if not prefix:
            raise KeyError(f"transformers' map covers no device for {name}")
        prefix = prefix.rpartition(".")[0]
    return device_map[prefix]


def _device_name(value) -> str:
    return f"cuda:{value}" if isinstance(value, int) else str(value)
