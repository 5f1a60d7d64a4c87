"""devicemap: run models too big for one device across every device of a machine."""

from .errors import CheckpointError, DeviceMapError, DeviceNotFoundError, DoesNotFitError, PipelineError
from .planning.plan import Plan
from .runtime.api import plan
from .runtime.dispatch import dispatch, remove_dispatch
from .runtime.load import load
from .workload import Workload

__all__ = [
    "CheckpointError",
    "DeviceMapError",
    "DeviceNotFoundError",
    "DoesNotFitError",
    "PipelineError",
    "Plan",
    "Workload",
    "dispatch",
    "load",
    "plan",
    "remove_dispatch",
]
