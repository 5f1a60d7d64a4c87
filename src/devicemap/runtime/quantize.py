"""Make a model's bitsandbytes parameters from its checkpoint as it loads, packed bytes on disk for disk blocks.

The quantizer put ``Params4bit`` and ``Int8Params`` on the meta skeleton (``quantize_on_meta``);
each is made here as transformers makes it, by bitsandbytes itself, so the tokens are
transformers' own: quantized from the checkpoint's dense weight at the load dtype, or, for a
pre-quantized checkpoint, rebuilt from the packed weight and quantization state it stores.
A disk block's packed tensors (the 4-bit bytes and their absmax, or the 8-bit bytes and their
row scales) are then mapped from a file: the checkpoint's own for a pre-quantized one, which
holds them as they compute, else devicemap's offload files, where they are written. The block
then streams a quarter (4-bit) or half (8-bit) of bf16's bytes from the file.
"""

import dataclasses
import sys
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PretrainedConfig

from ..errors import CheckpointError, DeviceMapError
from ..model.quantized import declared_quantization, quantization_method, quantization_state_names
from ..model.stored import DENSE_FLOATS
from ..storage.offload import OffloadFiles
from .materialize import BlockTensor, CheckpointTensors, PlacedBlock


def refuse_unloadable(config: PretrainedConfig) -> None:
    """Raise a DeviceMapError for a checkpoint stored in a format that devicemap cannot load on this machine.

    GPTQ, AWQ, FP8, MXFP4 and compressed-tensors are planned exactly from their headers,
    but their kernels need a GPU; bitsandbytes folders load.

    >>> import transformers
    >>> refuse_unloadable(transformers.LlamaConfig())
    """
    declared = declared_quantization(config)
    if declared is None or quantization_method(declared) == "bitsandbytes":
        return
    if torch.cuda.is_available():
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
    raise DeviceMapError(f"the checkpoint is stored quantized as {quantization_method(declared)}; {instead}")


def shapes_as_read(found_shapes: Mapping[str, tuple[int, ...]], model: nn.Module) -> dict[str, tuple[int, ...]]:
    """A checkpoint's shapes (by model names) as ``model``, quantized on meta, reads them.

    A pre-quantized bitsandbytes weight is read together with its quantization state, so the
    state's tensors are part of it, and it stands for the dense weight of the skeleton (its
    stored form is checked against the config when the model is profiled).

    >>> shapes_as_read({"weight": (2, 2)}, nn.Linear(2, 2))
    {'weight': (2, 2)}
    """
    config = getattr(model, "config", None)
    declared = declared_quantization(config) if isinstance(config, PretrainedConfig) else None
    if declared is None or quantization_method(declared) != "bitsandbytes":
        return dict(found_shapes)
    packed = {
        name: tuple(tensor.shape) for name, tensor in model.state_dict(keep_vars=True).items() if is_quantized(tensor)
    }
    state = {key for name in packed for key in quantization_state_names(name, declared)}
    return {name: packed.get(name, shape) for name, shape in found_shapes.items() if name not in state}


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
    """Make every bitsandbytes parameter of ``blocks`` from the checkpoint: quantized at ``dtype``, or as stored packed.

    A parameter stays in memory unless its block is on disk: then the packed tensors it was
    quantized to are written into ``files`` and the parameter computes on their mapping; a
    pre-quantized one computes on the checkpoint file's mapping, as it is stored.
    """
    for block in blocks:
        quantized = {tensor.name: tensor for tensor in block.tensors if is_quantized(tensor.value)}
        keys = {name: _stored_key(tensor, tensors) for name, tensor in quantized.items()}
        dense = {name for name, key in keys.items() if tensors.checkpoint.tensors[key].dtype in DENSE_FLOATS}
        made = {name: _quantize(quantized[name], keys[name], tensors, dtype) for name in dense}
        if quantized and block.placement.device == "disk":
            _offload(block, made, files)
        made |= {name: _read_packed(quantized[name], key, tensors) for name, key in keys.items() if name not in dense}
        for name, tensor in quantized.items():
            tensor.owner[tensor.key] = made[name]


def _stored_key(tensor: BlockTensor, tensors: CheckpointTensors) -> str:
    """The checkpoint tensor bitsandbytes makes ``tensor`` from: one stored weight."""
    source = tensors.find(tensor)
    if source is None or not source.direct:
        raise CheckpointError(
            f"{tensors.checkpoint.folder}: weight {tensor.name} is "
            f"{'missing' if source is None else 'built from several checkpoint tensors'}, and bitsandbytes "
            "quantizes one stored weight at a time; load this model without quantization_config"
        )
    return source.keys[0]


def _quantize(tensor: BlockTensor, key: str, tensors: CheckpointTensors, dtype: torch.dtype) -> nn.Parameter:
    """The parameter transformers' bitsandbytes conversion makes: built from the dense weight, then moved."""
    dense = tensors.checkpoint.tensor_to(key, "cpu", dtype)
    meta = tensor.value
    settings = {key: value for key, value in meta.__dict__.items() if key not in ("CB", "SCB")}
    made = type(meta)(dense, requires_grad=False, **settings).to("cpu")
    made._is_hf_initialized = True
    return made


def _read_packed(tensor: BlockTensor, key: str, tensors: CheckpointTensors) -> nn.Parameter:
    """The parameter transformers rebuilds from a pre-quantized checkpoint: its packed weight and state as stored.

    They stay views of the checkpoint file: at their stored dtype they are what the CPU computes on.
    """
    checkpoint = tensors.checkpoint
    module_key = key.rpartition(".")[0]
    names = quantization_state_names(key, declared_quantization(tensors.model.config))
    state = {
        name.removeprefix(f"{module_key}."): checkpoint.tensor(name) for name in names if name in checkpoint.tensors
    }
    meta = tensor.value
    if hasattr(meta, "quant_state"):
        made = type(meta).from_prequantized(
            checkpoint.tensor(key), state, requires_grad=False, device="cpu", module=tensor.module
        )
    else:
        settings = {key: value for key, value in meta.__dict__.items() if key not in ("CB", "SCB")}
        made = type(meta)(checkpoint.tensor(key), requires_grad=False, SCB=state["SCB"], **settings).to("cpu")
    made._is_hf_initialized = True
    return made


def _offload(block: PlacedBlock, made: dict[str, nn.Parameter], files: OffloadFiles) -> None:
    """Write each made parameter's packed tensors into the block's offload file and point the parameter at them.

    Every 4-bit module of the block then computes on the bytes of a file, its own or the checkpoint's.
    """
    if made:
        packed = {
            f"{name}.{part}": value for name, parameter in made.items() for part, value in _packed(parameter).items()
        }
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
