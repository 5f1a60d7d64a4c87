"""Checkpoints described by their safetensors headers alone: any size, a few kilobytes each.

A tensor is (safetensors dtype, shape, bytes). ``dense_tensors`` lists a model's tensors
as transformers saves them; ``awq_tensors`` as AutoAWQ's GEMM format stores a 4-bit
model (int32 ``qweight`` [in, out/8], int32 ``qzeros`` [in/group, out/8], float16
``scales`` [in/group, out]; embeddings, norms and the head stay float16). They become
sparse files on disk (``write_header_folder``) or files of the loopback Hub.
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig

from devicemap.model.skeleton import build_on_meta
from devicemap.storage.safetensors_file import DTYPE_NAMES

TensorSpec = tuple[str, list[int], int]
AWQ_GROUP = 128


def dense_tensors(config: PretrainedConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """The tensors a dense checkpoint of ``config`` holds at ``dtype``, tied ones once."""
    seen, tensors = set(), {}
    for name, tensor in build_on_meta(config, dtype).state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            tensors[name] = _spec(tensor.dtype, list(tensor.shape))
    return tensors


def awq_tensors(config: PretrainedConfig, group: int = AWQ_GROUP) -> dict[str, TensorSpec]:
    """The tensors of ``config`` quantized by AWQ 4-bit GEMM, every decoder linear packed, the rest float16."""
    model = build_on_meta(config, torch.float16)
    packed = {name for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layers." in name}
    tensors = {}
    for name, tensor in dense_tensors(config, torch.float16).items():
        module, _, leaf = name.rpartition(".")
        if module not in packed:
            tensors[name] = tensor
            continue
        outputs, inputs = tensor[1]
        if leaf == "weight":
            tensors[f"{module}.qweight"] = _spec(torch.int32, [inputs, outputs // 8])
            tensors[f"{module}.qzeros"] = _spec(torch.int32, [inputs // group, outputs // 8])
            tensors[f"{module}.scales"] = _spec(torch.float16, [inputs // group, outputs])
    return tensors


def header_file(tensors: Mapping[str, TensorSpec]) -> tuple[bytes, int]:
    """The length-prefixed safetensors header for ``tensors`` in order, and the whole file's size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, size_bytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size_bytes]}
        offset += size_bytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, 8 + len(encoded) + offset


def shard(tensors: Mapping[str, TensorSpec], shards: int) -> dict[str, dict[str, TensorSpec]]:
    """``tensors`` in order over ``shards`` files named as transformers names them."""
    names = list(tensors)
    per_shard = math.ceil(len(names) / shards)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    return {
        f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors": {name: tensors[name] for name in group}
        for index, group in enumerate(groups)
    }


def index_file(shards: Mapping[str, Mapping[str, TensorSpec]]) -> bytes:
    """model.safetensors.index.json for ``shards``."""
    weight_map = {name: file for file, tensors in shards.items() for name in tensors}
    total = sum(spec[2] for tensors in shards.values() for spec in tensors.values())
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}).encode()


def write_header_folder(folder: Path, config: PretrainedConfig, tensors: Mapping[str, TensorSpec], shards: int) -> Path:
    """A model folder whose safetensors files are sparse: real headers, holes for the data."""
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    files = shard(tensors, shards)
    for file, held in files.items():
        head, size_bytes = header_file(held)
        with (folder / file).open("wb") as stream:
            stream.write(head)
            stream.truncate(size_bytes)
    (folder / "model.safetensors.index.json").write_bytes(index_file(files))
    return folder


def _spec(dtype: torch.dtype, shape: list[int]) -> TensorSpec:
    return DTYPE_NAMES[dtype], shape, dtype.itemsize * math.prod(shape)

