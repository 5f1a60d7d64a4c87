"""A stage's tensors from a checkpoint: only the ones it needs, read lazily, in the module's layout.

Checkpoints keep transformers' saved layout, which can differ from the modules': a
mixture-of-experts layer saves one tensor per expert and computes with them fused. The
names to read come from transformers' own conversion run backwards on the stage's
``meta`` tensors (no data), and the tensors read are converted forwards with the same
conversion, so the stage gets exactly what ``from_pretrained`` would give it. A tensor
tied to another (an output head sharing the embedding) is read under its partner's
name when the checkpoint stores it once.
"""

from copy import deepcopy

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    PrefixChange,
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)

from .checkpoint import Checkpoint
from .errors import CheckpointError


def read_stage_state(
    model: PreTrainedModel, checkpoint: Checkpoint, names: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of ``model`` (built on meta) from ``checkpoint``, on ``device``, at the model's dtypes.

    Tied partners of those tensors come too, under their own names, sharing the data.

    >>> state = read_stage_state(model, open_checkpoint(folder), ["model.norm.weight"], torch.device("cpu"))  # doctest: +SKIP
    """
    expected = model.state_dict()
    saved = revert_weight_conversion(model, {name: expected[name] for name in names})
    aliases = _tied_aliases(model)
    missing, mismatched, read = [], [], {}
    for name, like in saved.items():
        source = next((alias for alias in (name, *aliases.get(name, ())) if alias in checkpoint.tensors), None)
        if source is None:
            missing.append(name)
        elif tuple(checkpoint.tensors[source].shape) != tuple(like.shape):
            found = list(checkpoint.tensors[source].shape)
            mismatched.append(f"{name} expects {list(like.shape)}, checkpoint has {found}")
        else:
            read[name] = checkpoint.tensor_to(source, device, like.dtype if like.dtype.is_floating_point else None)
    if missing or mismatched:
        raise CheckpointError(_describe_bad_tensors(checkpoint, missing, mismatched))
    state = _to_module_layout(model, read)
    for name in list(state):
        for alias in aliases.get(name, ()):
            state.setdefault(alias, state[name])  # a tied tensor stays one tensor under all its names
    return state


def _to_module_layout(model: PreTrainedModel, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apply transformers' load-time conversion (renames, fused experts…) to tensors in saved layout."""
    # A model built from its config, not loaded, has no prefix to strip: as in revert_weight_conversion.
    transforms = [t for t in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(t, PrefixChange)]
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    converter_of = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    pending: dict[str, WeightRenaming | WeightConverter] = {}
    for name in sorted(saved, key=dot_natural_key):
        target, pattern = rename_source_key(name, renamings, converters)
        if pattern is None:
            pending.setdefault(target, WeightRenaming(name, target)).add_tensor(target, name, name, saved[name])
        else:
            pending.setdefault(target, deepcopy(converter_of[pattern])).add_tensor(target, name, pattern, saved[name])
    state = {}
    for target, transform in pending.items():
        for name, value in transform.convert(target, model=model, config=model.config).items():
            state[name] = value[0] if isinstance(value, list) else value
    return state


def _tied_aliases(model: PreTrainedModel) -> dict[str, tuple[str, ...]]:
    """For each parameter shared under several names (tied embeddings), its other names."""
    names_of: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    return {
        name: tuple(other for other in names if other != name)
        for names in names_of.values()
        if len(names) > 1
        for name in names
    }


def _describe_bad_tensors(checkpoint: Checkpoint, missing: list[str], mismatched: list[str]) -> str:
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {', '.join(missing[:10])}")
    if mismatched:
        problems.append(f"{len(mismatched)} with another shape: {'; '.join(mismatched[:10])}")
    return (
        f"checkpoint {checkpoint.folder} does not match its config for this pipeline stage: "
        f"{' and '.join(problems)}; the weights and config.json must come from the same model"
    )
