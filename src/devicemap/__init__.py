"""devicemap: run models too big for one device across every device of a machine."""

from .errors import CheckpointError, DeviceMapError, DeviceNotFoundError, DoesNotFitError, PipelineError
from .workload import Workload

__all__ = [
    "CheckpointError",
    "DeviceMapError",
    "DeviceNotFoundError",
    "DoesNotFitError",
    "PipelineError",
    "Workload",
]
