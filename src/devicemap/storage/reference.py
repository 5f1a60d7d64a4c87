"""A model reference — a folder, a config.json, a config object or a Hub id — resolved to what describes it.

A plan needs the config and, where the reference has weights, their safetensors headers
(exact for quantized checkpoints); a load needs a local folder, which for a Hub id is its
snapshot in the Hugging Face cache.
"""

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PretrainedConfig

from ..errors import DeviceMapError
from ..model.skeleton import load_config
from ..model.stored import StoredLayout, StoredTensor
from .checkpoint import folder_tensors
from .hub import CODE_PATTERNS, LOAD_PATTERNS, fetch_model, hub_config, hub_tensors, is_hub_id
from .safetensors_file import TensorInfo
from .sources import map_sources

ModelReference = str | os.PathLike | PretrainedConfig


@dataclass(frozen=True)
class ResolvedModel:
    """What a reference names: its config, a name to show, and its safetensors tensors when it has weights."""

    name: str | None
    config: PretrainedConfig
    tensors: Mapping[str, TensorInfo] | None = None


def resolve_model(model: ModelReference, revision: str | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    """The config of ``model`` and, for a folder or Hub id with safetensors weights, their header tensors.

    A path that exists is local (a folder, or a config.json alone); otherwise ``ORG/NAME`` is
    a Hub id, read at ``revision``. Nothing but config.json and headers is read; a config
    whose model ships its own code is read only with ``trust_remote_code``.

    >>> resolve_model(PretrainedConfig()).tensors is None
    True
    """
    if isinstance(model, PretrainedConfig):
        _refuse_revision(revision, "a config object")
        return ResolvedModel(None, load_config(model))
    path = Path(model)
    if not path.exists() and is_hub_id(str(model)):
        config_path = hub_config(str(model), revision)
        tensors = hub_tensors(str(model), revision, config_path.parent)
        return ResolvedModel(str(model), load_config(config_path, trust_remote_code), tensors)
    _refuse_revision(revision, f"local path {str(path)!r}")
    config = load_config(path, trust_remote_code)
    folder = path.resolve() if path.is_dir() else path.resolve().parent
    return ResolvedModel(folder.name, config, folder_tensors(path) if path.is_dir() else None)


def model_folder(model: str | os.PathLike, revision: str | None = None, trust_remote_code: bool = False) -> Path:
    """The local folder to load ``model`` from: a folder as it is, a Hub id fetched into the Hugging Face cache.

    A Hub id's weights, config and tokenizer files are fetched at ``revision``, and its
    modeling code too when it is to run (``trust_remote_code``).

    >>> model_folder("/")
    PosixPath('/')
    """
    path = Path(model)
    if not path.exists() and is_hub_id(str(model)):
        return fetch_model(str(model), revision, LOAD_PATTERNS + (CODE_PATTERNS if trust_remote_code else ()))
    _refuse_revision(revision, f"local path {str(path)!r}")
    return path


def checkpoint_layout(model: nn.Module, tensors: Mapping[str, TensorInfo]) -> StoredLayout:
    """How ``tensors`` (a checkpoint's, by its names) lay out under ``model``'s names, by transformers' rules.

    >>> import torch
    >>> packed = {"weight": TensorInfo("weight", Path("w"), torch.int8, (2, 2)),
    ...           "weight_scale": TensorInfo("weight_scale", Path("w"), torch.float32, (2,))}
    >>> checkpoint_layout(nn.Linear(2, 2), packed).extra
    {'weight_scale': StoredTensor(dtype=torch.float32, numel=2, shape=(2,))}
    """
    sources = map_sources(model, {name: info.shape for name, info in tensors.items()}).sources
    held = {
        target: StoredTensor(
            tensors[source.keys[0]].dtype,
            sum(math.prod(tensors[key].shape) for key in source.keys),
            tuple(tensors[source.keys[0]].shape) if source.direct else None,
        )
        for target, source in sources.items()
    }
    used = {key for source in sources.values() for key in source.keys}
    extra = {
        name: StoredTensor(info.dtype, math.prod(info.shape), tuple(info.shape))
        for name, info in tensors.items()
        if name not in used
    }
    return StoredLayout(held, extra)


def _refuse_revision(revision: str | None, what: str) -> None:
    if revision is not None:
        raise DeviceMapError(f"revision {revision!r} applies to Hub ids (ORG/NAME), not to {what}; drop it")
