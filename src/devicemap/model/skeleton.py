"""A model's skeleton from its config: every tensor on the meta device, no memory, no weights read."""

import copy
import json
import os
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    MODEL_MAPPING_NAMES,
)

from ..errors import CheckpointError
from ..workload import dtype_name

# Tried in order when the config's ``architectures`` names no class transformers has.
AUTO_CLASSES = (
    (AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
    (AutoModelForSeq2SeqLM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
    (AutoModel, MODEL_MAPPING_NAMES),
)


def load_config(model: str | os.PathLike | PretrainedConfig, trust_remote_code: bool = False) -> PretrainedConfig:
    """The config of a local model folder or config.json file; a config object is copied.

    Nothing is downloaded: a path that does not exist is an error, not a hub name.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     transformers.LlamaConfig().save_pretrained(folder)
    ...     load_config(Path(folder) / "config.json").model_type
    'llama'
    """
    if isinstance(model, PretrainedConfig):
        # Building a model writes the dtype into its config; the caller's stays untouched.
        return copy.deepcopy(model)
    path = Path(model)
    if not path.exists():
        raise CheckpointError(
            f"model path {str(path)!r} does not exist; pass a local model folder holding config.json, "
            "or the path of a config.json file (nothing is downloaded)"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"model folder {str(path)!r} has no config.json; put the model's config.json there")
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as error:
        _refuse_untrusted_code(path, trust_remote_code)
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(
            f"cannot read the model config at {str(path)!r}: {reason} Check that it is a transformers "
            "config.json; for a model type this transformers does not know, upgrade transformers, or pass "
            "trust_remote_code=True if the folder ships its own modeling code"
        ) from error


def _refuse_untrusted_code(path: Path, trust_remote_code: bool) -> None:
    """A folder whose config names its own code (``auto_map``) needs the caller's consent to run it."""
    config_file = path / "config.json" if path.is_dir() else path
    try:
        auto_map = json.loads(config_file.read_text()).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return
    if auto_map and not trust_remote_code:
        raise CheckpointError(
            f"model folder {str(path.parent if path.is_file() else path)!r} ships its own modeling code "
            f"({', '.join(sorted(set(auto_map.values())))}, named by auto_map in config.json), which runs only "
            "when asked: read it, and pass trust_remote_code=True if you trust it"
        )


def config_dtype(config: PretrainedConfig) -> torch.dtype:
    """The dtype a config says its weights are stored in; float32 when it says nothing.

    >>> config_dtype(transformers.LlamaConfig(dtype="bfloat16"))
    torch.bfloat16
    """
    named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(named, torch.dtype):
        return named
    if isinstance(named, str) and named != "auto":
        return getattr(torch, dtype_name(named))
    return torch.float32


def load_dtype_of(config: PretrainedConfig, dtype: torch.dtype | str | None) -> torch.dtype:
    """The dtype a model loads at: ``dtype`` when given, else the one its config names.

    >>> load_dtype_of(transformers.LlamaConfig(dtype="bfloat16"), None), load_dtype_of(None, "fp16")
    (torch.bfloat16, torch.float16)
    """
    return config_dtype(config) if dtype is None else getattr(torch, dtype_name(dtype))


def build_on_meta(config: PretrainedConfig, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model a config describes, built under ``dtype`` with every tensor on the meta device.

    The class is the first of the config's ``architectures`` that transformers has, else
    a causal LM, else a sequence-to-sequence LM, else the bare model.

    >>> build_on_meta(transformers.LlamaConfig(num_hidden_layers=2), torch.bfloat16).lm_head.weight.device
    device(type='meta')
    """
    architecture = _architecture_class(config)
    with torch.device("meta"):
        if architecture is not None:
            return architecture._from_config(config, dtype=dtype)
        remote = getattr(config, "auto_map", None) or {}
        for auto_class, model_types in AUTO_CLASSES:
            if config.model_type in model_types or (trust_remote_code and auto_class.__name__ in remote):
                return auto_class.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    raise CheckpointError(
        f"transformers {transformers.__version__} has no model class for model_type {config.model_type!r} "
        f"(architectures {config.architectures}); upgrade transformers, or pass trust_remote_code=True "
        "if the model folder ships its own modeling code"
    )


def _architecture_class(config: PretrainedConfig) -> type | None:
    for name in config.architectures or ():
        candidate = getattr(transformers, name, None)
        config_class = getattr(candidate, "config_class", None)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, transformers.PreTrainedModel)
            and config_class is not None
            and isinstance(config, config_class)
        ):
            return candidate
    return None
