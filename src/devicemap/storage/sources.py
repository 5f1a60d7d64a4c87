"""Which checkpoint tensors make each tensor of a model, by transformers' own renaming and fusing rules.

Most model tensors are one checkpoint tensor under the same name. transformers 5 also
renames legacy names (``LayerNorm.gamma``), adds or strips the base model's prefix, and
fuses some tensors in memory that checkpoints keep apart (one tensor per MoE expert
becomes one tensor for all experts). This module applies the same rules the same way,
so that a folder transformers loads, devicemap loads identically.
"""

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key


@dataclass(frozen=True)
class Source:
    """How one model tensor is made: checkpoint tensor ``keys[0]`` as it is, or ``keys`` fused by ``converter``.

    ``patterns`` pairs each key with the converter's source pattern it matched.
    """

    target: str
    keys: tuple[str, ...]
    converter: object | None = None
    patterns: tuple[str, ...] = ()

    @property
    def direct(self) -> bool:
        return self.converter is None

    def make(self, read: Callable[[str], torch.Tensor], model: nn.Module) -> torch.Tensor:
        """The model tensor, on the CPU, from ``read(key)`` of each of its checkpoint tensors."""
        if self.direct:
            return read(self.keys[0])
        converter = copy.deepcopy(self.converter)
        for pattern, key in zip(self.patterns, self.keys):
            converter.add_tensor(self.target, key, pattern, lambda key=key: read(key))
        return converter.convert(self.target, model=model, config=getattr(model, "config", None))[self.target]


@dataclass(frozen=True)
class SourceMap:
    """Every model tensor the checkpoint provides, and what the checkpoint holds under model names.

    ``found_shapes`` maps model names to shapes (the model's own for fused tensors, which
    are checked once made) plus checkpoint names that match no model tensor, for
    ``keys.check_keys`` to report.
    """

    sources: Mapping[str, Source]
    found_shapes: Mapping[str, tuple[int, ...]]


def map_sources(model: nn.Module, shapes: Mapping[str, tuple[int, ...]]) -> SourceMap:
    """Match a checkpoint's tensors (name → shape) to ``model``'s state_dict.

    >>> map_sources(nn.Linear(2, 3), {"weight": (3, 2), "bias": (3,)}).sources["weight"]
    Source(target='weight', keys=('weight',), converter=None, patterns=())
    """
    expected = model.state_dict(keep_vars=True)
    if not hasattr(model, "base_model_prefix"):
        sources = {key: Source(key, (key,)) for key in shapes if key in expected}
        return SourceMap(sources, dict(shapes))
    rules = get_model_conversion_mapping(model, None, None)
    renamings = [rule for rule in rules if isinstance(rule, WeightRenaming)]
    converters = [rule for rule in rules if isinstance(rule, WeightConverter)]
    by_pattern = {pattern: rule for rule in converters for pattern in rule.source_patterns}
    direct: dict[str, Source] = {}
    fused: dict[str, list[tuple[str, str]]] = {}
    found: dict[str, tuple[int, ...]] = {}
    # Natural order (expert 2 before expert 10), as transformers stacks them.
    for key in sorted(shapes, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, expected)
        if target not in expected and key in expected:
            target, pattern = key, None
        if pattern is None:
            direct.setdefault(target, Source(target, (key,)))
            found[target] = tuple(shapes[key])
        else:
            fused.setdefault(target, []).append((pattern, key))
            found[target] = tuple(expected[target].shape) if target in expected else tuple(shapes[key])
    sources = {name: source for name, source in direct.items() if name in expected}
    for target, pairs in fused.items():
        if target in expected:
            patterns, keys = zip(*pairs)
            sources[target] = Source(target, keys, by_pattern[patterns[0]], patterns)
    return SourceMap(sources, found)
