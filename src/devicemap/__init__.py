"""devicemap: run models too big for one device across every device of a machine."""

from .errors import CheckpointError, DeviceMapError, DeviceNotFoundError, DoesNotFitError, PipelineError
from .plan import Plan
from .workload import Workload
from .api import plan  # noqa: E402  (after .plan: the function, not the module, is devicemap.plan)
from .dispatch import dispatch, remove_dispatch
from .load import load

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
