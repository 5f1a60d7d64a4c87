"""Quantized models as plain data: the layout transformers' quantizer gives a skeleton, sized exactly.

A quantizer replaces modules before any weight loads (``from_pretrained`` calls its
``preprocess_model`` on the meta skeleton); doing the same here shows which modules
hold packed weights and which stay at the compute dtype (embeddings, heads, norms and
any module the config skips). bitsandbytes parameters still look dense on the meta
device, so their bytes once loaded are computed here from bitsandbytes' own layout.
"""

import copy
import importlib
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers
from torch import nn
from transformers import BitsAndBytesConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D
from transformers.quantizers import AutoHfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import DeviceMapError

# bitsandbytes 4-bit: values per absmax unless the parameter says otherwise; with double
# quantization the absmaxes are themselves quantized to bytes in blocks of 256, each
# block keeping a float32 absmax, beside a float32 offset and a 256-value float32 code.
_FOUR_BIT_BLOCK = 64
_NESTED_BLOCK = 256
_NESTED_CODE_VALUES = 256
_FOUR_BIT_CODE_VALUES = 16
_FLOAT32_BYTES = 4


def declared_quantization(config: PretrainedConfig) -> dict | QuantizationConfigMixin | None:
    """The quantization a config says its checkpoint is stored in; ``None`` for a dense checkpoint.

    >>> declared_quantization(transformers.LlamaConfig(quantization_config={"quant_method": "awq", "bits": 4}))
    {'quant_method': 'awq', 'bits': 4}
    """
    own = getattr(config, "quantization_config", None)
    return own or getattr(config.get_text_config(decoder=True), "quantization_config", None)


def quantize_on_meta(
    model: nn.Module, requested: QuantizationConfigMixin | None, dtype: torch.dtype
) -> nn.Module:
    """``model`` (on the meta device) with the modules its quantizer puts there before weights load.

    The quantization is the one the model's config declares (a pre-quantized checkpoint)
    or ``requested`` (quantized while loading, e.g. bitsandbytes); with neither the model
    is returned as it is. ``dtype`` is the compute dtype of what stays unquantized.

    >>> quantize_on_meta(nn.Linear(2, 2), None, torch.float32)
    Linear(in_features=2, out_features=2, bias=True)
    """
    config = getattr(model, "config", None)
    declared = declared_quantization(config) if isinstance(config, PretrainedConfig) else None
    if declared is not None and requested is not None:
        raise DeviceMapError(
            f"the model is already quantized ({quantization_method(declared)} in its config.json), so it cannot "
            f"also be quantized while loading ({quantization_method(requested)}); drop quantization_config "
            "(CLI: --quantize)"
        )
    chosen = declared if declared is not None else requested
    if chosen is None:
        return model
    pre_quantized = declared is not None
    with _library_named(quantization_method(chosen), pre_quantized):
        _require_library(chosen, pre_quantized)
        quantizer = _quantizer(chosen, pre_quantized)
        quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None, use_kernels=False)
    return model


def quantized_tensor_bytes(tensor: torch.Tensor) -> int | None:
    """Bytes a bitsandbytes parameter holds once loaded, its quantization state included; ``None`` for others.

    4-bit: the values packed two a byte, a float32 absmax per block (or, with double
    quantization, a byte per block plus the nested state) and the 16-value code. 8-bit:
    a byte per value and a float32 scale per row (``SCB``).

    >>> quantized_tensor_bytes(torch.ones(2, 2)) is None
    True
    """
    bitsandbytes = sys.modules.get("bitsandbytes")
    if bitsandbytes is None:
        return None
    if isinstance(tensor, bitsandbytes.nn.Params4bit):
        return _four_bit_bytes(tensor)
    if isinstance(tensor, bitsandbytes.nn.Int8Params):
        return tensor.numel() + _FLOAT32_BYTES * tensor.shape[0]
    return None


def bitsandbytes_config(quantization: dict | QuantizationConfigMixin) -> BitsAndBytesConfig:
    """``quantization`` (a config.json's dict or a config object) as transformers reads bitsandbytes settings.

    >>> bitsandbytes_config({"quant_method": "bitsandbytes", "load_in_8bit": True}).load_in_8bit
    True
    """
    return _quantizer(quantization, pre_quantized=True).quantization_config


def bitsandbytes_weights(model: nn.Module, quantization: dict | QuantizationConfigMixin) -> tuple[str, ...]:
    """The weights transformers' bitsandbytes quantizer packs in ``model``; none for another method.

    Those of the linear layers it does not skip (the head, tied and fp32-kept modules, and
    ``llm_int8_skip_modules``), found as ``replace_with_bnb_linear`` finds them; ``model`` is
    dense on the meta device or already quantized there, and bitsandbytes need not be installed.

    >>> from devicemap.model.skeleton import build_on_meta
    >>> config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=8, intermediate_size=16,
    ...                                   num_attention_heads=2, vocab_size=16)
    >>> eight_bit = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    >>> bitsandbytes_weights(build_on_meta(config, torch.float32), eight_bit)[:2]
    ('model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.k_proj.weight')
    """
    if quantization_method(quantization) != "bitsandbytes":
        return ()
    quantizer = _quantizer(quantization, pre_quantized=True)
    skipped = quantizer.get_modules_to_not_convert(
        model, quantizer.quantization_config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )
    return tuple(
        f"{name}.weight"
        for name, module in model.named_modules()
        if _converts(module) and should_convert_module(name, skipped)
    )


def quantization_state_names(weight: str, quantization: dict | QuantizationConfigMixin) -> tuple[str, ...]:
    """The names a pre-quantized checkpoint may keep ``weight``'s quantization state under, as transformers saves it.

    >>> quantization_state_names("fc.weight", {"quant_method": "bitsandbytes", "load_in_8bit": True})
    ('fc.SCB', 'fc.weight_format')
    """
    module, _, parameter = weight.rpartition(".")
    names = _quantizer(quantization, pre_quantized=True).serialized_names.get(parameter, ())
    return tuple(".".join(part for part in (module, name) if part) for name in names if name != parameter)


def _converts(module: nn.Module) -> bool:
    """A module bitsandbytes' conversion replaces, or one it already has: only exact linear layers are replaced."""
    return (
        type(module) is nn.Linear
        or isinstance(module, Conv1D)
        or quantized_tensor_bytes(getattr(module, "weight", None)) is not None
    )


def _four_bit_bytes(parameter) -> int:
    """Before quantization (on the meta device) the parameter has its dense shape; after, its state does."""
    state = parameter.quant_state
    values = math.prod(state.shape) if state is not None else parameter.numel()
    storage_bytes = parameter.quant_storage.itemsize
    packed_bytes = (values + 1) // (2 * storage_bytes) * storage_bytes
    blocks = -(-values // (parameter.blocksize or _FOUR_BIT_BLOCK))
    if parameter.compress_statistics:
        nested_blocks = -(-blocks // _NESTED_BLOCK)
        absmax_bytes = blocks + _FLOAT32_BYTES * (1 + nested_blocks + _NESTED_CODE_VALUES)
    else:
        absmax_bytes = _FLOAT32_BYTES * blocks
    return packed_bytes + absmax_bytes + _FLOAT32_BYTES * _FOUR_BIT_CODE_VALUES


def _quantizer(quantization: dict | QuantizationConfigMixin, pre_quantized: bool):
    try:
        return AutoHfQuantizer.from_config(copy.deepcopy(quantization), pre_quantized=pre_quantized)
    except (ValueError, TypeError) as error:
        raise DeviceMapError(
            f"transformers {transformers.__version__} cannot quantize with {quantization_method(quantization)}: "
            f"{str(error).splitlines()[0]} Upgrade transformers, or check the quantization_config"
        ) from None


def _require_library(quantization: dict | QuantizationConfigMixin, pre_quantized: bool) -> None:
    """Raise transformers' own ImportError, which names the pip package, when the method's library is missing.

    Its check also refuses machines without the accelerator the method runs on, which a
    plan for another machine must not, and may switch the config to dequantizing: so it
    runs on a copy, its warnings about this machine are silenced, and only its ImportError counts.
    The bitsandbytes check also demands accelerate, which only transformers' own dispatch
    uses; devicemap dispatches itself, so for bitsandbytes only bitsandbytes is required.
    """
    if quantization_method(quantization) == "bitsandbytes":
        importlib.import_module("bitsandbytes")
        return
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        _quantizer(quantization, pre_quantized).validate_environment(device_map=None, weights_only=True)
    except (RuntimeError, ValueError):
        pass
    finally:
        transformers.logging.set_verbosity(verbosity)


@contextmanager
def _library_named(method: str, pre_quantized: bool) -> Iterator[None]:
    """Turn a missing quantization library into an error that says what to install."""
    try:
        yield
    except ImportError as error:
        instead = (
            "; or plan from a model folder or Hub id holding the weights: their safetensors headers size the "
            "plan without it"
            if pre_quantized
            else ""
        )
        # transformers' own message names the pip package; a bare import failure names the module.
        install = f" (pip install {error.name})" if error.name else ""
        raise DeviceMapError(
            f"sizing a {method} model needs its quantization library, which this Python lacks: "
            f"{str(error).splitlines()[0]}{install}{instead}"
        ) from None


def quantization_method(quantization: dict | QuantizationConfigMixin) -> str:
    """The method's name as transformers spells it in ``quant_method``.

    >>> quantization_method({"quant_method": "gptq", "bits": 4})
    'gptq'
    """
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization.quant_method
    return str(getattr(method, "value", method))
