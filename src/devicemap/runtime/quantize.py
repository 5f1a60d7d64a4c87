"""Quantize a model's bitsandbytes parameters from its checkpoint as it loads, packed bytes on disk for disk blocks.

The quantizer put ``Params4bit`` and ``Int8Params`` on the meta skeleton (``quantize_on_meta``);
each is made here as transformers makes it, from the checkpoint's weight at the load dtype,
by bitsandbytes itself, so the tokens are transformers' own. A disk block's packed tensors
(the 4-bit bytes and their absmax, or the 8-bit bytes and their row scales) go into
devicemap's offload files and are mapped back: the block then streams a quarter (4-bit)
or half (8-bit) of bf16's bytes from the file.
"""

import dataclasses
import sys
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import CheckpointError, DeviceMapError
from ..model.quantized import declared_quantization, quantization_method
from ..storage.offload import OffloadFiles
from .materialize import BlockTensor, CheckpointTensors, PlacedBlock


def refuse_unloadable(config: PretrainedConfig) -> None:
    """Raise a DeviceMapError for a checkpoint stored in a format that devicemap cannot load on this machine.

    GPTQ, AWQ, FP8, MXFP4 and compressed-tensors are planned exactly from their headers,
    but their kernels need a GPU.

    >>> import transformers
    >>> refuse_unloadable(transformers.LlamaConfig())
    """
    declared = declared_quantization(config)
    if declared is None:
        return
    method = quantization_method(declared)
    if method == "bitsandbytes":
        instead = (
            "devicemap does not read pre-quantized bitsandbytes folders yet: load the unquantized model with "
            "quantization_config=BitsAndBytesConfig(...), which makes the same packed layout while loading"
        )
    elif torch.cuda.is_available():
        instead = (
            "devicemap plans it (devicemap.plan) but does not load it yet: pass plan.device_map to transformers' "
            "from_pretrained"
        )
    else:
        instead = (
            "its kernels need a GPU and this machine has none: load it on a machine with a GPU, or load the "
            "unquantized model (optionally with quantization_config=BitsAndBytesConfig(load_in_4bit=True), which "
            "runs on the CPU); devicemap.plan still sizes it here"
        )
    raise DeviceMapError(f"the checkpoint is stored quantized as {method}; {instead}")


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a bitsandbytes parameter (4-bit or 8-bit).

    >>> is_quantized(torch.ones(2))
    False
    """
    bitsandbytes = sys.modules.get("bitsandbytes")
    return bitsandbytes is not None and isinstance(tensor, (bitsandbytes.nn.Params4bit, bitsandbytes.nn.Int8Params))


def without_quantized(blocks: Sequence[PlacedBlock]) -> list[PlacedBlock]:
    """``blocks`` without their bitsandbytes parameters: what ``materialize`` places as it is.

    >>> from devicemap.model.profile import profile_module
    >>> from devicemap.planning.planner import make_plan
    >>> from devicemap.runtime.materialize import blocks_of
    >>> model = nn.Sequential(nn.Linear(2, 2))
    >>> blocks = blocks_of(model, make_plan(profile_module(model), {"cpu": 2**20}))
    >>> [len(block.tensors) for block in without_quantized(blocks)]
    [2]
    """
    return [
        dataclasses.replace(block, tensors=tuple(t for t in block.tensors if not is_quantized(t.value)))
        for block in blocks
    ]


def quantize_blocks(
    blocks: Sequence[PlacedBlock], tensors: CheckpointTensors, dtype: torch.dtype, files: OffloadFiles
) -> None:
    """Quantize every bitsandbytes parameter of ``blocks`` from the checkpoint's weight at ``dtype``.

    A parameter stays in memory unless its block is on disk: then its packed tensors are
    written into ``files`` and the parameter computes on their mapping.
    """
    for block in blocks:
        quantized = [tensor for tensor in block.tensors if is_quantized(tensor.value)]
        made = {tensor.name: _quantize(tensor, tensors, dtype) for tensor in quantized}
        if made and block.placement.device == "disk":
            _offload(block, made, files)
        for tensor in quantized:
            tensor.owner[tensor.key] = made[tensor.name]


def _quantize(tensor: BlockTensor, tensors: CheckpointTensors, dtype: torch.dtype) -> nn.Parameter:
    """The parameter transformers' bitsandbytes conversion makes: built from the dense weight, then moved."""
    source = tensors.find(tensor)
    if source is None or not source.direct:
        raise CheckpointError(
            f"{tensors.checkpoint.folder}: weight {tensor.name} is "
            f"{'missing' if source is None else 'built from several checkpoint tensors'}, and bitsandbytes "
            "quantizes one stored weight at a time; load this model without quantization_config"
        )
    dense = tensors.checkpoint.tensor_to(source.keys[0], "cpu", dtype)
    meta = tensor.value
    settings = {key: value for key, value in meta.__dict__.items() if key not in ("CB", "SCB")}
    made = type(meta)(dense, requires_grad=False, **settings).to("cpu")
    made._is_hf_initialized = True
    return made


def _offload(block: PlacedBlock, made: dict[str, nn.Parameter], files: OffloadFiles) -> None:
    """Write each parameter's packed tensors into the block's offload file and point the parameter at them."""
    packed = {f"{name}.{part}": value for name, parameter in made.items() for part, value in _packed(parameter).items()}
    specs = [(name, value.dtype, tuple(value.shape)) for name, value in packed.items()]
    mapped = files.write_block(block.placement.block, specs, packed.__getitem__)
    for name, parameter in made.items():
        own = {part.removeprefix(f"{name}."): mapped[part] for part in packed if part.startswith(f"{name}.")}
        _repoint(parameter, own)
    for module in block.module.modules():
        # bitsandbytes repacks 4-bit weights in memory for AVX512-BF16 on a first CPU forward,
        # which would pull a disk block into memory for good; it computes on the file's bytes instead.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _packed(parameter: nn.Parameter) -> dict[str, torch.Tensor]:
    """The tensors that hold a quantized parameter's values: the payload is most of them, the rest are its scales."""
    state = getattr(parameter, "quant_state", None)
    if state is None:
        return {"weight": parameter.data, "SCB": parameter.SCB}
    parts = {"weight": parameter.data, "absmax": state.absmax}
    if state.nested:
        parts["nested_absmax"] = state.state2.absmax
    return parts


def _repoint(parameter: nn.Parameter, mapped: dict[str, torch.Tensor]) -> None:
    parameter.data = mapped["weight"]
    state = getattr(parameter, "quant_state", None)
    if state is None:
        parameter.CB = parameter.data
        parameter.SCB = mapped["SCB"]
        return
    state.absmax = mapped["absmax"]
    if state.nested:
        state.state2.absmax = mapped["nested_absmax"]
