"""The one exception family devicemap raises for anything the caller can fix."""


class DeviceMapError(ValueError):
    """Something about the model, the devices or the request that the caller can fix.

    Every message says what was wrong, with names and numbers, and what to do.
    """


class DoesNotFitError(DeviceMapError):
    """The model and the workload's reserves do not fit in the budgets given."""


class CheckpointError(DeviceMapError):
    """A model folder or checkpoint file is missing, incomplete or inconsistent."""


class DeviceNotFoundError(DeviceMapError):
    """A device was named that this machine does not have."""


class PipelineError(DeviceMapError):
    """A pipeline stage failed, died or stopped answering."""
