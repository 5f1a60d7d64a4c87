"""The public entry points: plan a model's placement, from a folder, a config or a module."""

import os
from collections.abc import Mapping

import torch
from torch import nn

from ..devices import DeviceLike, planning_budgets
from ..model.profile import Profile, profile_config, profile_module
from ..workload import Workload, dtype_name
from .plan import Plan
from .planner import make_plan

ModelLike = str | os.PathLike | nn.Module | Profile


def plan(
    model: ModelLike,
    strategy: str | DeviceLike | Mapping = "auto",
    *,
    dtype: torch.dtype | str | None = None,
    max_memory: Mapping[DeviceLike, int | str] | str | None = None,
    workload: Workload | None = None,
    offload: bool = True,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> Plan:
    """Plan where every part of ``model`` goes, from its config alone; nothing is loaded.

    ``model`` is a model folder, a config.json, an ``nn.Module`` or a ``Profile``.
    ``strategy`` is "auto", "balanced", "balanced_low_0", "sequential", a manual dict of
    module-name prefixes to devices, or one device. ``max_memory`` may name devices this
    machine does not have, to plan for another machine. ``trust_remote_code`` runs the
    modeling code a model folder ships (its config's ``auto_map``); pass it only for a
    folder you trust.

    >>> p = devicemap.plan("llama-70b/config.json", dtype=torch.bfloat16,
    ...                    max_memory={i: "80GiB" for i in range(8)})  # doctest: +SKIP
    >>> print(p)  # doctest: +SKIP
    """
    profile = profile_of(model, dtype, trust_remote_code)
    budgets = planning_budgets(max_memory, offload_folder)
    return make_plan(profile, budgets, workload, strategy, offload=offload)


def profile_of(
    model: ModelLike, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> Profile:
    """The profile of a model folder, config file, module, or a profile given as is."""
    if isinstance(model, Profile):
        return model
    if isinstance(model, nn.Module):
        return profile_module(model, dtype)
    return profile_config(model, dtype_name(dtype) if dtype is not None else None, trust_remote_code)
