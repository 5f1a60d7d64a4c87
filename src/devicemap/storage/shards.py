"""Write tensors as a Hugging Face folder of safetensors shards with an index.

Folders written here are read by ``open_checkpoint`` and by transformers alike.
"""

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..model.profile import names_per_tensor
from .checkpoint import SAFETENSORS_INDEX
from .safetensors_file import specs_of, write_safetensors

# Shard names follow transformers' pattern, so its from_pretrained reads our folders.
_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"


def write_sharded(folder: Path, tensors: Mapping[str, torch.Tensor], shard_count: int) -> tuple[Path, ...]:
    """Write ``tensors`` into ``folder`` as ``shard_count`` files of about equal bytes, in order.

    More than one shard also writes ``model.safetensors.index.json``; one shard is a
    plain ``model.safetensors``. A tensor saved under several names (tied weights) is
    written once, under its first name, as transformers does. Returns the files.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     [path.name for path in write_sharded(Path(folder), {"a": torch.ones(2), "b": torch.ones(2)}, 2)]
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    unique = {names[0]: tensors[names[0]] for names in names_per_tensor(tensors.items())}
    if shard_count < 1:
        raise CheckpointError(f"shard count {shard_count} must be at least 1")
    groups = _split_by_bytes(list(unique), unique, max(min(shard_count, len(unique)), 1))
    if len(groups) == 1:
        path = folder / "model.safetensors"
        _write(path, unique)
        return (path,)
    paths = tuple(folder / _SHARD_NAME.format(index=i + 1, count=len(groups)) for i in range(len(groups)))
    total_bytes = sum(_write(path, {name: unique[name] for name in names}) for path, names in zip(paths, groups))
    weight_map = {name: path.name for path, names in zip(paths, groups, strict=True) for name in names}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return paths


def _write(path: Path, tensors: Mapping[str, torch.Tensor]) -> int:
    return write_safetensors(path, specs_of(tensors), tensors.__getitem__)


def _split_by_bytes(names: list[str], tensors: Mapping[str, torch.Tensor], count: int) -> list[list[str]]:
    """Cut ``names`` into ``count`` consecutive non-empty groups of about equal bytes.

    Each name goes to the group its middle byte falls in, so a large tensor lands
    where most of it belongs rather than where it starts.
    """
    sizes = [tensors[name].numel() * tensors[name].dtype.itemsize for name in names]
    total_bytes = max(sum(sizes), 1)
    groups: list[list[str]] = [[] for _ in range(count)]
    group = 0
    written_bytes = 0
    for position, (name, size) in enumerate(zip(names, sizes, strict=True)):
        by_bytes = min(count - 1, (2 * written_bytes + size) * count // (2 * total_bytes))
        # One group further at most per name, and far enough that none is left empty.
        group = max(min(by_bytes, group + 1), count - (len(names) - position))
        groups[group].append(name)
        written_bytes += size
    return groups
