"""Sliding-window caches held to their window once their block has run.

transformers' ``DynamicSlidingWindowLayer`` concatenates the new keys and values to
the ones it holds and keeps a view of the last ``sliding_window - 1`` tokens. After a
prefill longer than the window, that view keeps the whole prompt's keys and values
alive until the layer's next update, and at that moment every sliding layer of the
model holds the whole prompt: more than a plan reserves, which is a window per layer.
A hook after each block with sliding layers copies such a view into storage of its
own, so a layer's whole prompt lives only while the layer runs.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicSlidingWindowLayer

# Decoder layers take the cache under the first of these keywords; earlier transformers used the others.
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value")


def trim_windows_after(layer_indices: tuple[int, ...]) -> Callable:
    """A forward hook (``with_kwargs=True``) trimming the sliding layers ``layer_indices`` of the cache passed in.

    >>> layer = nn.Linear(2, 2)
    >>> handle = layer.register_forward_hook(trim_windows_after((0,)), with_kwargs=True)
    >>> layer(torch.ones(1, 2)).shape
    torch.Size([1, 2])
    """

    def trim(module: nn.Module, args, kwargs, output) -> None:
        layers = getattr(_cache_in(kwargs), "layers", None)
        if layers is None:
            return
        for index in layer_indices:
            if index < len(layers) and isinstance(layers[index], DynamicSlidingWindowLayer):
                _own_window(layers[index])

    return trim


def _cache_in(kwargs: dict):
    for keyword in _CACHE_KEYWORDS:
        if kwargs.get(keyword) is not None:
            return kwargs[keyword]
    return None


def _own_window(layer: DynamicSlidingWindowLayer) -> None:
    """Copy keys and values that view a wider tensor into storage of their own.

    Each decoding step leaves a view one token narrower than its storage; that is what
    the plan counts, so only a wider storage is copied.
    """
    for name in ("keys", "values"):
        tensor = getattr(layer, name, None)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.shape[-2] == 0:
            continue
        token_bytes = tensor.nbytes // tensor.shape[-2]
        if tensor.untyped_storage().nbytes() > tensor.nbytes + token_bytes:
            setattr(layer, name, tensor.clone())
