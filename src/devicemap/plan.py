"""Plan: where every block lives and computes, and the per-device ledger derived from that."""

from dataclasses import dataclass

from .profile import Profile
from .workload import Workload


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
class Plan:
    """A device map with the budgets, workload and reasons that produced it."""

    profile: Profile
    workload: Workload
    budgets: tuple[tuple[str, int], ...]
    strategy: str
    placements: tuple[Placement, ...]
    reasons: tuple[str, ...] = ()
