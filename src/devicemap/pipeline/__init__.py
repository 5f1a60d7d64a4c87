"""Pipeline-parallel generation: one process per device, each holding one contiguous stage of the model."""

from .api import Pipeline, generate, plan_stages

__all__ = ["Pipeline", "generate", "plan_stages"]
