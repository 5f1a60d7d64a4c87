"""Moving a block's inputs and a model's outputs between devices, through nested containers.

Tensors inside tuples, lists and dicts move; anything else (a KV cache object, numbers)
is passed as it is, so caches stay on the devices of the layers that fill them.
"""

import copy
from collections.abc import Mapping

import torch
from torch import nn


def moved(value, device: torch.device, non_blocking: bool):
    """``value`` with every tensor in it (through tuples, lists and dicts) on ``device``; itself if none moved.

    Anything else (a KV cache object, numbers) is passed as is: caches stay where their layers are.
    This runs before every block, so finding nothing to move allocates nothing.

    >>> moved({"mask": torch.ones(2), "cache": None}, torch.device("meta"), non_blocking=False)["mask"].device
    device(type='meta')
    """
    if isinstance(value, torch.Tensor):
        return value if value.device == device else value.to(device, non_blocking=non_blocking)
    if isinstance(value, (tuple, list)):
        items = None
        for index, item in enumerate(value):
            new = moved(item, device, non_blocking)
            if new is not item:
                items = list(value) if items is None else items
                items[index] = new
        if items is None:
            return value
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, Mapping):
        result = None
        for key, item in value.items():
            new = moved(item, device, non_blocking)
            if new is not item:
                # A copy keeps the mapping's type (a transformers ModelOutput too) and leaves the caller's as it was.
                result = copy.copy(value) if result is None else result
                result[key] = new
        return value if result is None else result
    return value


def return_to_input_device(module, args, kwargs, output):
    """A forward hook: the module's output on the device of its first input tensor."""
    device = first_tensor_device((args, kwargs))
    if device is None:
        return None
    # Copies to the CPU must be finished before the caller reads them.
    result = moved(output, device, non_blocking=device.type != "cpu")
    return None if result is output else result


def first_tensor_device(value) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        device = first_tensor_device(item)
        if device is not None:
            return device
    return None


class _EncoderOutputs:
    """transformers' ``generate`` asks an offloaded model's encoder for outputs on its inputs' device.

    It looks for an accelerate hook at ``encoder._hf_hook`` and sets its ``io_same_device``;
    this stands in for one, so that generate neither needs accelerate nor adds its hooks.
    """

    def __init__(self):
        self.io_same_device = False

    def __call__(self, module, args, kwargs, output):
        return return_to_input_device(module, args, kwargs, output) if self.io_same_device else None


def hook_encoder(module: nn.Module, handles: list) -> nn.Module | None:
    """Give an encoder-decoder's encoder the stand-in hook; return the encoder, or None without one."""
    get_encoder = getattr(module, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    if not isinstance(encoder, nn.Module) or encoder is module:
        return None
    outputs = _EncoderOutputs()
    handles.append(encoder.register_forward_hook(outputs, with_kwargs=True))
    encoder.__dict__["_hf_hook"] = outputs
    return encoder
