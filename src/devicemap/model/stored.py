"""What a checkpoint stores, in the model's own names: the sizes a plan of a pre-quantized model starts from.

A quantized checkpoint's safetensors headers are exact for every format (GPTQ, AWQ,
compressed-tensors, FP8, MXFP4, bitsandbytes), with no quantization library at hand:
packed weights are stored as the integers or small floats they stay in memory, beside
scales and zero points the dense model does not have.
"""

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CheckpointError
from .quantized import declared_quantization

# Floating-point tensors a model converts to its load dtype; narrower floats (FP8, FP4) are quantized payload.
DENSE_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a checkpoint stores it: its dtype and element count (a fused model tensor sums its parts)."""

    dtype: torch.dtype
    numel: int

    @property
    def size_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def is_dense_form_of(self, tensor: torch.Tensor) -> bool:
        """Whether this is ``tensor``'s values in a dense float dtype, which the model converts on loading.

        >>> StoredTensor(torch.float16, 4).is_dense_form_of(torch.empty(2, 2, device="meta"))
        True
        """
        return self.dtype in DENSE_FLOATS and self.numel == tensor.numel()


@dataclass(frozen=True)
class StoredLayout:
    """A checkpoint's tensors by the model's names (after transformers' renaming and fusing rules).

    ``tensors`` are those the model has; ``extra`` are those it lacks, by checkpoint name:
    in a quantized checkpoint the packed weights, scales and zero points that replace the
    dense weights; in a dense one, unexpected keys the loader leaves out.
    """

    tensors: Mapping[str, StoredTensor]
    extra: Mapping[str, StoredTensor]


def counted_layout(module: nn.Module, stored: StoredLayout) -> StoredLayout:
    """The part of ``stored`` that loads into ``module`` (a dense skeleton of the checkpoint's model).

    When the config declares quantization, packed tensors replace the dense parameters
    they quantize: a parameter the checkpoint lacks holds nothing, and the tensors the
    dense model lacks count instead. In a dense checkpoint those are unexpected keys,
    which the loader leaves out. Checks first that a checkpoint declared quantized holds
    something quantized.

    >>> counted_layout(nn.Linear(2, 2), StoredLayout({}, {"scales": StoredTensor(torch.float16, 2)})).extra
    {}
    """
    config = getattr(module, "config", None)
    if config is None or declared_quantization(config) is None:
        return StoredLayout(stored.tensors, {})
    _require_quantized(module, stored)
    replaced = {
        name: StoredTensor(parameter.dtype, 0)
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if name not in stored.tensors
    }
    return StoredLayout({**replaced, **stored.tensors}, stored.extra)


def _require_quantized(module: nn.Module, stored: StoredLayout) -> None:
    """A config declaring quantization over weights all stored dense is a mismatch: name one such weight."""
    quantized = [
        name
        for name, tensor in module.state_dict(keep_vars=True).items()
        if name in stored.tensors and not stored.tensors[name].is_dense_form_of(tensor)
    ]
    if stored.extra or quantized:
        return
    method = declared_quantization(module.config)
    method = method.get("quant_method") if isinstance(method, dict) else method.quant_method
    dense = next(
        (
            f"{name}.weight"
            for name, child in module.named_modules()
            if isinstance(child, nn.Linear) and f"{name}.weight" in stored.tensors
        ),
        next(iter(stored.tensors), "(none)"),
    )
    held = stored.tensors.get(dense, StoredTensor(torch.float32, 0))
    raise CheckpointError(
        f"config.json declares {method} quantization but the checkpoint holds every weight dense: tensor "
        f"{dense!r} is stored as {held.numel} {held.dtype} values, as the unquantized model has it, and no "
        "tensor is packed. The config and the weights come from different models: fetch the quantized weights, "
        "or remove quantization_config from config.json to plan the dense model"
    )
