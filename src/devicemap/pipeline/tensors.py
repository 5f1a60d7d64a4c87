"""A stage's tensors from a checkpoint: only the ones it needs, read lazily, in the module's layout.

Checkpoints keep transformers' saved layout, which can differ from the modules': a
mixture-of-experts layer saves one tensor per expert and computes with them fused.
``sources.map_sources`` says which checkpoint tensors make each module tensor, by
transformers' own rules, so the stage gets exactly what ``from_pretrained`` would give
it while reading nothing outside the stage. A tensor tied to another (an output head
sharing the embedding) is read under its partner's name when the checkpoint stores it once.
"""

import torch
from transformers import PreTrainedModel

from ..errors import CheckpointError
from ..storage.checkpoint import Checkpoint
from ..storage.sources import map_sources


def read_stage_state(
    model: PreTrainedModel, checkpoint: Checkpoint, names: list[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors ``names`` of ``model`` (built on meta) from ``checkpoint``, on ``device``, at the model's dtypes.

    Tied partners of those tensors come too, under their own names, sharing the data.

    >>> checkpoint = open_checkpoint(folder)  # doctest: +SKIP
    >>> state = read_stage_state(model, checkpoint, ["model.norm.weight"], torch.device("cpu"))  # doctest: +SKIP
    """
    sources = map_sources(model, checkpoint.shapes)
    expected = model.state_dict()
    aliases = _tied_aliases(model)
    state, missing, mismatched = {}, [], []
    for name in names:
        found = next((alias for alias in (name, *aliases.get(name, ())) if alias in sources.sources), None)
        if found is None:
            missing.append(name)
            continue
        like = expected[name]
        if sources.sources[found].direct and tuple(sources.found_shapes[found]) != tuple(like.shape):
            mismatched.append(f"{name} expects {list(like.shape)}, checkpoint has {list(sources.found_shapes[found])}")
            continue
        dtype = like.dtype if like.dtype.is_floating_point else None
        tensor = sources.sources[found].make(lambda key: checkpoint.tensor_to(key, device, dtype), model)
        if tuple(tensor.shape) != tuple(like.shape):
            mismatched.append(f"{name} expects {list(like.shape)}, its checkpoint tensors make {list(tensor.shape)}")
            continue
        state[name] = tensor
        state.update({alias: tensor for alias in aliases.get(name, ())})  # a tied tensor stays one tensor
    if missing or mismatched:
        raise CheckpointError(_describe_bad_tensors(checkpoint, missing, mismatched))
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
