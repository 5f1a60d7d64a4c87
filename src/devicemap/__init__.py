"""devicemap: run models too big for one device across every device of a machine."""

from importlib import import_module

from .errors import CheckpointError, DeviceMapError, DeviceNotFoundError, DoesNotFitError, PipelineError

# The names below import torch, which takes seconds; importing them on first use keeps
# `import devicemap` (and so `devicemap --help`) instant.
_MODULE_OF = {
    "Plan": ".planning.plan",
    "Workload": ".workload",
    "dispatch": ".runtime.dispatch",
    "load": ".runtime.load",
    "plan": ".runtime.api",
    "remove_dispatch": ".runtime.dispatch",
}

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


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'devicemap' has no attribute {name!r}")
    value = getattr(import_module(_MODULE_OF[name], __name__), name)
    globals()[name] = value
    return value
