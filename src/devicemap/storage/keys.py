"""Compare the tensors a checkpoint holds with those a model expects: names and shapes.

A model may leave some names out on purpose: tied weights saved once, keys it
declares ignorable, non-persistent buffers that old checkpoints still carry. Those
are not problems; everything else is listed, all at once.
"""

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ..errors import CheckpointError
from ..model.profile import names_per_tensor
from ..units import first_of

_SHOWN_PER_LIST = 10


@dataclass(frozen=True)
class ShapeMismatch:
    """A tensor the model and the checkpoint both name, with different shapes."""

    name: str
    expected: tuple[int, ...]
    found: tuple[int, ...]


@dataclass(frozen=True)
class KeyReport:
    """What differs between a model's state_dict and a checkpoint, each list sorted by name."""

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[ShapeMismatch, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        """The problems, one kind per line, long lists cut with a count of the rest."""
        shapes = [
            f"{m.name} expects {list(m.expected)}, checkpoint has {list(m.found)}" for m in self.mismatched
        ]
        problems = [
            (self.missing, "missing (the model has them, the checkpoint does not)"),
            (self.unexpected, "unexpected (the checkpoint has them, the model does not)"),
            (shapes, "with another shape"),
        ]
        return "\n".join(f"{len(items)} {what}: {first_of(items, _SHOWN_PER_LIST)}" for items, what in problems if items)


def compare_keys(found_shapes: Mapping[str, Sequence[int]], model: nn.Module) -> KeyReport:
    """Compare a checkpoint's tensor names and shapes with ``model``'s state_dict.

    ``model`` may live on the meta device. Tolerated: a tied weight whose partner the
    checkpoint holds, names matching the model's ``_keys_to_ignore_on_load_missing``
    or ``_keys_to_ignore_on_load_unexpected``, and non-persistent buffers.

    >>> compare_keys({"weight": (3, 2), "scale": (3,)}, nn.Linear(2, 3))
    KeyReport(missing=('bias',), unexpected=('scale',), mismatched=())
    """
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items()}
    tied_partners = _tied_partners(model)
    missing = [
        name
        for name in expected
        if name not in found_shapes
        and not tied_partners.get(name, set()) & found_shapes.keys()
        and not _matches_any(name, getattr(model, "_keys_to_ignore_on_load_missing", None))
    ]
    tolerated = _non_persistent_buffers(model)
    unexpected = [
        name
        for name in found_shapes
        if name not in expected
        and name not in tolerated
        and not _matches_any(name, getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    ]
    mismatched = [
        ShapeMismatch(name, expected[name], tuple(shape))
        for name, shape in found_shapes.items()
        if name in expected and expected[name] != tuple(shape)
    ]
    return KeyReport(
        tuple(sorted(missing)), tuple(sorted(unexpected)), tuple(sorted(mismatched, key=lambda m: m.name))
    )


def check_keys(
    found_shapes: Mapping[str, Sequence[int]], model: nn.Module, source: str = "the checkpoint"
) -> KeyReport:
    """Like ``compare_keys``, but raise a ``CheckpointError`` listing every problem if any.

    ``source`` names the checkpoint in the message (e.g. its folder).

    >>> check_keys({"weight": (3, 2)}, nn.Linear(2, 3), source="linear.safetensors")
    Traceback (most recent call last):
    devicemap.errors.CheckpointError: linear.safetensors does not match Linear:
    1 missing (the model has them, the checkpoint does not): bias
    ...
    """
    report = compare_keys(found_shapes, model)
    if report.ok:
        return report
    raise CheckpointError(
        f"{source} does not match {type(model).__name__}:\n{report.describe()}\n"
        "Check that config.json describes these weights (architecture and sizes) and that every file "
        "was copied"
    )


def _tied_partners(model: nn.Module) -> dict[str, set[str]]:
    """Map each name of a shared tensor to the other names it shares it with."""
    partners: dict[str, set[str]] = {}
    for names in names_per_tensor(model.state_dict(keep_vars=True).items()):
        for name in names:
            partners.setdefault(name, set()).update(set(names) - {name})
    # transformers declares ties (target -> source) that a model built on meta may not have applied.
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        partners.setdefault(target, set()).add(source)
        partners.setdefault(source, set()).add(target)
    return partners


def _non_persistent_buffers(model: nn.Module) -> set[str]:
    return {
        f"{module_name}.{buffer}" if module_name else buffer
        for module_name, module in model.named_modules(remove_duplicate=False)
        for buffer in module._non_persistent_buffers_set
    }


def _matches_any(name: str, patterns: Iterable[str] | None) -> bool:
    return any(re.search(pattern, name) for pattern in patterns or ())

