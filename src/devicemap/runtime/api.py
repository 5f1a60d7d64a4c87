"""The public entry points: plan a model's placement, from a folder, a config, a Hub id or a module."""

import os
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..devices import DeviceLike, planning_budgets, runtime_reserves
from ..errors import DeviceMapError
from ..model.profile import Profile, profile_config, profile_module
from ..model.quantized import quantize_on_meta
from ..model.skeleton import build_on_meta, load_dtype_of
from ..model.stored import require_dense_to_quantize
from ..planning.plan import Plan
from ..planning.planner import make_plan
from ..storage.reference import ResolvedModel, checkpoint_layout, resolve_model
from ..workload import Workload

ModelLike = str | os.PathLike | PretrainedConfig | nn.Module | Profile


def plan(
    model: ModelLike,
    strategy: str | DeviceLike | Mapping = "auto",
    *,
    dtype: torch.dtype | str | None = None,
    max_memory: Mapping[DeviceLike, int | str] | str | None = None,
    workload: Workload | None = None,
    offload: bool = True,
    offload_folder: str | os.PathLike | None = None,
    quantization_config: QuantizationConfigMixin | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Plan:
    """Plan where every part of ``model`` goes, from its config and safetensors headers; no weight is read.

    ``model`` is a model folder, a config.json, a Hub id ``ORG/NAME`` (at ``revision``), a
    config object, an ``nn.Module`` or a ``Profile``. ``strategy`` is "auto", "balanced",
    "balanced_low_0", "sequential", a manual dict of module-name prefixes to devices, or
    one device. ``max_memory`` may name devices this machine does not have, to plan for
    another machine. ``quantization_config`` (e.g. transformers' ``BitsAndBytesConfig``)
    plans the model quantized while loading; a checkpoint already quantized is planned
    from the layout it is stored in. ``trust_remote_code`` runs the modeling code a model
    folder ships (its config's ``auto_map``); pass it only for a folder you trust.

    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=100)
    >>> plan(config, "cpu", max_memory={"cpu": "1GiB"}).device_map
    {'': 'cpu'}
    """
    profile = profile_of(
        model, dtype, quantization_config=quantization_config, revision=revision, trust_remote_code=trust_remote_code
    )
    budgets = planning_budgets(max_memory, offload_folder)
    return make_plan(profile, budgets, workload, strategy, offload, runtime_reserves(budgets))


def profile_of(
    model: ModelLike,
    dtype: torch.dtype | str | None = None,
    *,
    quantization_config: QuantizationConfigMixin | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Profile:
    """The profile of a model folder, config file, config, Hub id or module, or a profile given as is.

    Blocks are sized from the checkpoint's safetensors headers where there are weights,
    else from the config (with the quantizer's layout when it quantizes).

    >>> profile_of(nn.Sequential(nn.Linear(4, 4)), "bfloat16").blocks[0].weight_bytes
    40
    """
    if isinstance(model, (Profile, nn.Module)):
        _refuse_options_for(model, quantization_config, revision)
        return model if isinstance(model, Profile) else profile_module(model, dtype)
    resolved = resolve_model(model, revision, trust_remote_code)
    if resolved.tensors is None:
        profile = profile_config(resolved.config, dtype, trust_remote_code, quantization=quantization_config)
    else:
        profile = _profile_stored(resolved, dtype, quantization_config, trust_remote_code)
    return profile if resolved.name is None else replace(profile, name=resolved.name)


def _profile_stored(resolved: ResolvedModel, dtype, quantization_config, trust_remote_code: bool) -> Profile:
    """Sized from the safetensors headers; quantized while loading, the quantizer's layout sizes what it packs.

    A checkpoint already quantized is sized as stored, with no quantization library.
    """
    load_dtype = load_dtype_of(resolved.config, dtype)
    skeleton = build_on_meta(resolved.config, load_dtype, trust_remote_code)
    stored = checkpoint_layout(skeleton, resolved.tensors)
    require_dense_to_quantize(skeleton, stored, quantization_config)
    if quantization_config is not None:
        skeleton = quantize_on_meta(skeleton, quantization_config, load_dtype)
    return profile_module(skeleton, load_dtype, stored=stored)


def _refuse_options_for(model: nn.Module | Profile, quantization_config, revision) -> None:
    given = [name for name, value in (("quantization_config", quantization_config), ("revision", revision)) if value]
    if given:
        raise DeviceMapError(
            f"{' and '.join(given)} apply to a model folder, config or Hub id; a {type(model).__name__} is planned "
            "as it is: drop them"
        )
