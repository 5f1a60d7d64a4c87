"""What a checkpoint stores, in the model's own names: the sizes a plan of a pre-quantized model starts from.

A quantized checkpoint's safetensors headers are exact for every format (GPTQ, AWQ,
compressed-tensors, FP8, MXFP4, bitsandbytes), with no quantization library at hand:
packed weights are stored as the integers or small floats they stay in memory, beside
scales and zero points the dense model does not have.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from transformers import BitsAndBytesConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import CheckpointError
from .quantized import bitsandbytes_config, bitsandbytes_weights, declared_quantization, quantization_method

# Floating-point tensors a model converts to its load dtype; narrower floats (FP8, FP4) are quantized payload.
DENSE_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a checkpoint stores it: its dtype and element count (a fused model tensor sums its parts).

    ``shape`` is the stored shape, which messages name; ``None`` for a model tensor fused from several.
    """

    dtype: torch.dtype
    numel: int
    shape: tuple[int, ...] | None = None

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
    declared = declared_quantization(module.config)
    if stored.extra or quantized:
        _require_bitsandbytes_layout(module, stored, declared)
        return
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
        f"config.json declares {_declared(declared)} quantization but the checkpoint holds every weight dense: tensor "
        f"{dense!r} is stored as {held.numel} {held.dtype} values, as the unquantized model has it, and no "
        "tensor is packed. The config and the weights come from different models: fetch the quantized weights, "
        "or remove quantization_config from config.json to plan the dense model"
    )


def require_dense_to_quantize(
    module: nn.Module, stored: StoredLayout, quantization: QuantizationConfigMixin | None
) -> None:
    """Raise a CheckpointError naming a weight ``quantization`` would quantize while loading but that is stored packed.

    bitsandbytes quantizes dense weights; a checkpoint already quantized loads as it is stored.

    >>> require_dense_to_quantize(nn.Linear(2, 2), StoredLayout({}, {}), None)
    """
    if quantization is None:
        return
    for name, tensor in _packed_weights(module, stored, quantization):
        if _stored_form(name, stored).fits(_dense_form(tensor)):
            continue
        declared = declared_quantization(module.config)
        instead = (
            f"config.json declares {_declared(declared)}: drop quantization_config (CLI: --quantize) and the folder "
            "loads as it is stored"
            if declared is not None
            else "config.json declares no quantization: put back the quantization_config saved with these weights "
            "into config.json, and drop quantization_config (CLI: --quantize)"
        )
        raise CheckpointError(
            f"quantization_config asks to quantize the weights while loading (bitsandbytes "
            f"{_settings(bitsandbytes_config(quantization))}), which starts from dense "
            f"weights: {name!r} as {_dense_form(tensor).describe()}; but the checkpoint holds it already quantized, as "
            f"{_stored_description(name, stored)}; {instead}"
        )


@dataclass(frozen=True)
class _Form:
    """How a checkpoint stores one weight: dtype, shape, and the quantization state beside it."""

    dtypes: frozenset[torch.dtype]
    shape: tuple[int, ...]
    beside: frozenset[str]

    def fits(self, implied: "_Form") -> bool:
        same_size = math.prod(self.shape) == math.prod(implied.shape)
        return self.dtypes <= implied.dtypes and same_size and self.beside == implied.beside

    def describe(self) -> str:
        dtype = "float" if self.dtypes == DENSE_FLOATS else "/".join(str(d).removeprefix("torch.") for d in self.dtypes)
        beside = f" beside {', '.join(map(repr, sorted(self.beside)))}" if self.beside else ""
        return f"{dtype} {list(self.shape)}{beside}"


def _require_bitsandbytes_layout(
    module: nn.Module, stored: StoredLayout, declared: dict | QuantizationConfigMixin
) -> None:
    """Each weight a bitsandbytes config packs is stored in the packed form it declares: name the first that is not."""
    for name, tensor in _packed_weights(module, stored, declared):
        implied = _packed_form(name, tensor, bitsandbytes_config(declared))
        if _stored_form(name, stored).fits(implied):
            continue
        raise CheckpointError(
            f"config.json declares {_declared(declared)}, which stores {name!r} as {implied.describe()}; but the "
            f"checkpoint holds it as {_stored_description(name, stored)}. The config and the weights come from "
            "different saves: use the config.json saved with these weights, or fetch the weights this config describes "
            "(a module kept dense on purpose belongs in its llm_int8_skip_modules)"
        )


def _packed_weights(
    module: nn.Module, stored: StoredLayout, quantization: dict | QuantizationConfigMixin
) -> list[tuple[str, torch.Tensor]]:
    """The weights bitsandbytes packs under ``quantization`` that the checkpoint holds, with their skeleton tensors."""
    return [
        (name, module.get_parameter(name))
        for name in bitsandbytes_weights(module, quantization)
        if name in stored.tensors
    ]


def _packed_form(weight: str, tensor: torch.Tensor, config: BitsAndBytesConfig) -> _Form:
    """How transformers saves ``weight`` (dense ``tensor``) quantized by bitsandbytes with ``config``."""
    if config.load_in_8bit:
        return _Form(frozenset({torch.int8}), tuple(tensor.shape), frozenset({f"{weight.rpartition('.')[0]}.SCB"}))
    storage = config.bnb_4bit_quant_storage
    beside = {f"{weight}.quant_state.bitsandbytes__{config.bnb_4bit_quant_type}"}
    if config.bnb_4bit_use_double_quant:
        beside.add(f"{weight}.nested_absmax")
    # bitsandbytes packs two values a byte into a column of its storage dtype.
    return _Form(frozenset({storage}), ((tensor.numel() + 1) // (2 * storage.itemsize), 1), frozenset(beside))


def _dense_form(tensor: torch.Tensor) -> _Form:
    return _Form(DENSE_FLOATS, tuple(tensor.shape), frozenset())


def _stored_form(weight: str, stored: StoredLayout) -> _Form:
    held = stored.tensors[weight]
    return _Form(frozenset({held.dtype}), held.shape or (held.numel,), _state_markers(weight) & stored.extra.keys())


def _stored_description(weight: str, stored: StoredLayout) -> str:
    form = _stored_form(weight, stored)
    return form.describe() if form.beside else f"{form.describe()}, with no quantization state beside it"


def _state_markers(weight: str) -> frozenset[str]:
    """The stored state that tells bitsandbytes' forms apart: the 4-bit type, double quantization, 8-bit row scales."""
    module = weight.rpartition(".")[0]
    return frozenset(
        {
            f"{weight}.quant_state.bitsandbytes__nf4",
            f"{weight}.quant_state.bitsandbytes__fp4",
            f"{weight}.nested_absmax",
            f"{module}.SCB",
        }
    )


def _declared(declared: dict | QuantizationConfigMixin) -> str:
    if quantization_method(declared) != "bitsandbytes":
        return quantization_method(declared)
    return f"bitsandbytes {_settings(bitsandbytes_config(declared))}"


def _settings(config: BitsAndBytesConfig) -> str:
    if config.load_in_8bit:
        return "8-bit"
    double = " with double quantization" if config.bnb_4bit_use_double_quant else ""
    return f"4-bit {config.bnb_4bit_quant_type}{double}"
