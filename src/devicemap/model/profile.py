"""A model as plain data: its execution blocks, their bytes, ties and per-token cache.

Everything the planner needs about a model and nothing else, so that planning a
671B model is arithmetic over a few hundred small records.
"""

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..workload import dtype_bytes, dtype_name
from .activation import activation_values_per_token
from .cache_size import BlockCache, block_caches
from .quantized import quantize_on_meta, quantized_tensor_bytes
from .skeleton import build_on_meta, load_config, load_dtype_of
from .stored import StoredLayout, StoredTensor, counted_layout

# Config fields that bound the positions a model can attend to, in order of preference.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class Block:
    """One unit of placement, never split across devices: a module such as "model.layers.3".

    ``weight_bytes`` counts parameters at the load dtype (or the dtype the model keeps
    them in), excluding tensors already counted in an earlier block of a tie.
    ``kv_values_per_token`` is what one sequence caches per token in this block (keys and
    values, or a compressed latent), capped at ``kv_window`` tokens when the layer uses a
    sliding window; ``state_values`` is a fixed per-sequence state (linear attention,
    state-space layers). Both are counts of values; the workload's kv dtype sizes them.
    ``float32_state_values`` is the part of the fixed state that the model's code keeps in
    float32 whatever the dtype (Mamba and gated-delta-rule recurrent states): 4 bytes each.
    ``activation_bytes_per_token`` is the largest transient tensor of a forward pass over
    the block, per token of the batch, at the load dtype. ``context_values_per_token`` is what
    a forward that adds tokens to a non-empty cache allocates per cached token (a prefill
    chunk after the first; see ``cache_size``), counted in values like the cache.
    """

    name: str
    weight_bytes: int
    buffer_bytes: int = 0
    kv_values_per_token: int = 0
    kv_window: int | None = None
    state_values: int = 0
    activation_bytes_per_token: int = 0
    tensor_names: tuple[str, ...] = ()
    float32_state_values: int = 0
    context_values_per_token: int = 0

    def cache_bytes(self, batch_size: int, tokens: int, kv_dtype: torch.dtype | str) -> int:
        """Bytes this block caches for ``batch_size`` sequences of ``tokens`` tokens each.

        >>> Block("model.layers.0", 0, kv_values_per_token=2048).cache_bytes(4, 8192, "bfloat16")
        134217728
        """
        cached_tokens = tokens if self.kv_window is None else min(tokens, self.kv_window)
        values = self.kv_values_per_token * cached_tokens + self.state_values
        return batch_size * (values * dtype_bytes(kv_dtype) + self.float32_state_values * 4)


@dataclass(frozen=True)
class Profile:
    """A model's blocks in execution order, with what ties them together.

    ``tied`` holds groups of block names that share a tensor and so must share a device;
    the shared bytes count in the first block of each group. ``head`` names the block
    that computes the output logits (``None`` for models without one). ``chunked_prefill``
    says whether transformers' ``generate`` prefills the model in chunks when its generation
    config has a ``prefill_chunk_size``.
    """

    name: str
    dtype: str
    blocks: tuple[Block, ...]
    tied: tuple[tuple[str, ...], ...] = ()
    head: str | None = None
    vocab_size: int = 0
    max_context: int | None = None
    module_names: tuple[str, ...] = ()
    chunked_prefill: bool = False


def profile_module(
    module: nn.Module,
    dtype: torch.dtype | str | None = None,
    no_split: Iterable[str] | None = None,
    stored: StoredLayout | None = None,
) -> Profile:
    """The blocks of any module, on any device (meta included), as the planner sees them.

    ``dtype`` is the load dtype of floating-point tensors (``None``: as they are now);
    ``no_split`` names module classes never to split (default: the model's ``_no_split_modules``).
    ``stored`` is what the checkpoint holds: a tensor stored packed is sized as stored, and
    when the config declares quantization the tensors the dense model lacks (packed
    weights, scales, zero points) count in the block whose name prefixes theirs, in place
    of the dense weights they replace.

    >>> profile = profile_module(nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100)), "bfloat16")
    >>> [(block.name, block.weight_bytes) for block in profile.blocks]
    [('0', 1600), ('1', 1800)]
    """
    load_dtype = getattr(torch, dtype_name(dtype)) if dtype is not None else _prevailing_dtype(module)
    config = _text_config(module)
    head = _output_embeddings(module)
    units = _units(module, _no_split_names(module, no_split))
    counted = counted_layout(module, stored) if stored is not None else None
    sizes, tied = _size_units(units, _tensor_sizer(module, load_dtype if dtype is not None else None, counted))
    if counted is not None:
        sizes = _add_extra(units, sizes, counted.extra)
    caches = block_caches(module, [unit.whole_module for unit in units])
    activations = _activation_bytes(units, config, head, load_dtype)
    head_block = _head_block(module, head, units)
    blocks = tuple(map(_block, units, sizes, caches, activations))
    return Profile(
        name=_model_name(module),
        dtype=dtype_name(load_dtype),
        blocks=blocks,
        tied=tied,
        head=head_block,
        vocab_size=_vocab_size(head, config) if head_block is not None else 0,
        max_context=_max_context(config),
        module_names=tuple(name for name, _ in module.named_modules(remove_duplicate=False) if name),
        chunked_prefill=_prefills_in_chunks(module, blocks),
    )


def profile_config(
    model: str | os.PathLike | PretrainedConfig,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    quantization: QuantizationConfigMixin | None = None,
) -> Profile:
    """A model's profile from its config alone: the skeleton is built on the meta device, no weights read.

    ``model`` is a model folder, a bare config.json, or a config object; ``dtype`` ``None``
    means the config's dtype, else float32. A quantization the config declares, or
    ``quantization`` to quantize while loading (bitsandbytes), is applied to the skeleton
    by transformers' quantizer, so blocks are sized as they will be in memory.

    >>> from transformers import LlamaConfig
    >>> config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, vocab_size=100)
    >>> profile_config(config, dtype="bfloat16").blocks[1].name
    'model.layers.0'
    """
    config = load_config(model, trust_remote_code)
    load_dtype = load_dtype_of(config, dtype)
    skeleton = quantize_on_meta(build_on_meta(config, load_dtype, trust_remote_code), quantization, load_dtype)
    profile = profile_module(skeleton, load_dtype)
    if isinstance(model, PretrainedConfig):
        return profile
    path = Path(model).resolve()
    return replace(profile, name=(path.parent if path.is_file() else path).name)


def names_per_tensor(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, ...]]:
    """The names of each distinct tensor of ``named``, in the order first seen.

    A tensor reached under several names (tied weights) is one entry with all its names.
    Tensors are told apart by identity: one object, or views of the same elements
    (``state_dict()`` gives each name an object of its own). Meta and empty tensors have
    no elements to compare, so for them only one object is one tensor.

    >>> embedding, head = nn.Embedding(4, 2), nn.Linear(2, 4, bias=False)
    >>> head.weight = embedding.weight
    >>> names_per_tensor(nn.Sequential(embedding, head).state_dict().items())
    [('0.weight', '1.weight')]
    """
    # Holding every tensor keeps an id from being reused by another one meanwhile.
    held = list(named)
    groups: dict[object, list[str]] = {}
    for name, tensor in held:
        groups.setdefault(_identity(tensor), []).append(name)
    return [tuple(names) for names in groups.values()]


def _identity(tensor: torch.Tensor) -> object:
    if tensor.is_meta or not tensor.numel():
        return id(tensor)
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


@dataclass(frozen=True)
class _Unit:
    """A block in the making: a module with all its tensors, or only the tensors it holds itself."""

    name: str
    module: nn.Module
    direct_only: bool = False

    @property
    def whole_module(self) -> nn.Module | None:
        return None if self.direct_only else self.module

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor, bool]]:
        """(full name, tensor, is a parameter), every name of a tied tensor included."""
        recurse = not self.direct_only
        for name, parameter in self.module.named_parameters(self.name, recurse, remove_duplicate=False):
            yield name, parameter, True
        for name, buffer in self.module.named_buffers(self.name, recurse, remove_duplicate=False):
            yield name, buffer, False


def _no_split_names(module: nn.Module, no_split: Iterable[str] | None) -> frozenset[str]:
    if no_split is not None:
        return frozenset(no_split)
    return frozenset(getattr(module, "_no_split_modules", None) or ())


def _units(module: nn.Module, no_split: frozenset[str]) -> list[_Unit]:
    """Blocks in registration order: no-split modules, list elements and leaves holding tensors, whole.

    A module holding tensors of its own beside its children gets a block named after it
    for just those tensors: in a device map the longest matching prefix wins, so that name
    places them and nothing else.
    """
    units: list[_Unit] = []

    def visit(name: str, current: nn.Module, whole: bool) -> None:
        children = list(current.named_children())
        if whole or not children or type(current).__name__ in no_split:
            if _holds_tensors(current, recurse=True):
                units.append(_Unit(name, current))
            return
        if _holds_tensors(current, recurse=False):
            units.append(_Unit(name, current, direct_only=True))
        is_list = isinstance(current, (nn.ModuleList, nn.ModuleDict, nn.Sequential))
        for child_name, child in children:
            visit(f"{name}.{child_name}" if name else child_name, child, whole=is_list)

    visit("", module, whole=False)
    return units


def _holds_tensors(module: nn.Module, recurse: bool) -> bool:
    return any(True for _ in module.parameters(recurse)) or any(True for _ in module.buffers(recurse))


def _tensor_sizer(module: nn.Module, load_dtype: torch.dtype | None, stored: StoredLayout | None):
    """Bytes of a tensor once loaded: floating point at the load dtype unless the model keeps it in float32.

    Quantized tensors keep their form: as the checkpoint stores them when it packs them,
    as bitsandbytes holds them, and at the dtype the quantizer gave the rest of a quantized
    model's tensors, as transformers loads them.
    """
    keep_fp32 = _fp32_pattern(module, load_dtype)
    keep_own_dtypes = getattr(module, "is_quantized", False)
    held = stored.tensors if stored is not None else {}

    def tensor_bytes(name: str, tensor: torch.Tensor) -> int:
        if name in held and not held[name].is_dense_form_of(tensor):
            return held[name].size_bytes
        quantized_bytes = quantized_tensor_bytes(tensor)
        if quantized_bytes is not None:
            return quantized_bytes
        if load_dtype is None or not tensor.is_floating_point():
            return tensor.numel() * tensor.element_size()
        if keep_fp32 is not None and keep_fp32.search(name):
            return tensor.numel() * torch.float32.itemsize
        if keep_own_dtypes:
            return tensor.numel() * tensor.element_size()
        return tensor.numel() * load_dtype.itemsize

    return tensor_bytes


def _fp32_pattern(module: nn.Module, load_dtype: torch.dtype | None) -> re.Pattern | None:
    """transformers' rule: ``_keep_in_fp32_modules`` under float16, ``..._strict`` under float16 and bfloat16.

    The names are unanchored regular expressions with ``*`` as a wildcard, matched as transformers does.
    """
    names = set()
    if load_dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if load_dtype == torch.float16:
        names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if not names:
        return None
    return re.compile("|".join(f"(?:{name.replace('*', '.*')})" for name in sorted(names)))


def _size_units(units: list[_Unit], tensor_bytes) -> tuple[list[tuple[int, int, tuple[str, ...]]], tuple]:
    """Per unit (weight bytes, buffer bytes, tensor names), and the groups of units sharing a tensor.

    A tensor reached under several names (tied weights) counts once, in the first unit that holds it.
    """
    tensors = [list(unit.named_tensors()) for unit in units]
    home = {name: (index, tensor, parameter) for index, held in enumerate(tensors) for name, tensor, parameter in held}
    byte_counts = [{True: 0, False: 0} for _ in units]
    holdings = []
    for names in names_per_tensor((name, tensor) for name, (_, tensor, _) in home.items()):
        index, tensor, is_parameter = home[names[0]]
        byte_counts[index][is_parameter] += tensor_bytes(names[0], tensor)
        holdings.append(list(dict.fromkeys(home[name][0] for name in names)))
    sizes = [
        (counts[True], counts[False], tuple(name for name, _, _ in held))
        for counts, held in zip(byte_counts, tensors, strict=True)
    ]
    return sizes, _tie_groups(holdings, [unit.name for unit in units])


def _add_extra(
    units: list[_Unit], sizes: list[tuple[int, int, tuple[str, ...]]], extra: Mapping[str, StoredTensor]
) -> list[tuple[int, int, tuple[str, ...]]]:
    """Add each extra tensor's bytes to the weights of the unit with the longest name prefixing its name.

    One that no unit prefixes belongs to no module of the model; the loader leaves it out.
    """
    added = [0] * len(units)
    for name, tensor in extra.items():
        holders = [i for i, unit in enumerate(units) if not unit.name or name.startswith(unit.name + ".")]
        if holders:
            added[max(holders, key=lambda i: len(units[i].name))] += tensor.size_bytes
    return [(weight + more, buffer, names) for (weight, buffer, names), more in zip(sizes, added)]


def _tie_groups(holdings: list[list[int]], names: list[str]) -> tuple[tuple[str, ...], ...]:
    """Units linked by shared tensors, merged transitively (union-find), each group in block order."""
    parent = list(range(len(names)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for holding in holdings:
        for other in holding[1:]:
            parent[root(other)] = root(holding[0])
    groups: dict[int, list[str]] = {}
    for index in sorted({index for holding in holdings if len(holding) > 1 for index in holding}):
        groups.setdefault(root(index), []).append(names[index])
    return tuple(tuple(group) for group in groups.values())


def _activation_bytes(units: list[_Unit], config, head: nn.Module | None, load_dtype: torch.dtype) -> list[int]:
    hidden_size = getattr(config, "hidden_size", 0) or 0
    experts_per_token = getattr(config, "num_experts_per_tok", None) or 1
    return [
        0 if unit.direct_only
        else activation_values_per_token(unit.module, hidden_size, experts_per_token, head) * load_dtype.itemsize
        for unit in units
    ]


def _block(unit: _Unit, size: tuple[int, int, tuple[str, ...]], cache: BlockCache, activation_bytes: int) -> Block:
    weight_bytes, buffer_bytes, tensor_names = size
    return Block(
        name=unit.name,
        weight_bytes=weight_bytes,
        buffer_bytes=buffer_bytes,
        kv_values_per_token=cache.kv_values_per_token,
        kv_window=cache.kv_window,
        state_values=cache.state_values,
        activation_bytes_per_token=activation_bytes,
        tensor_names=tensor_names,
        float32_state_values=cache.float32_state_values,
        context_values_per_token=cache.context_values_per_token,
    )


def _prefills_in_chunks(module: nn.Module, blocks: tuple[Block, ...]) -> bool:
    """Whether transformers' ``generate`` splits this model's prefill into chunks of ``prefill_chunk_size``.

    It does for the decoder-only models it ships whose forward takes its ``Cache``. A model
    with its own code keeps its cache its own way; an encoder-decoder runs its encoder whole;
    a recurrent state (Mamba, linear attention) would have to be carried from chunk to chunk
    by the mixer's own kernels, which devicemap has not checked, so those plan whole prompts.
    """
    supports_cache = getattr(module, "_supports_default_dynamic_cache", None)
    return (
        isinstance(module, PreTrainedModel)
        and module.can_generate()
        and callable(supports_cache)
        and supports_cache()
        and type(module).__module__.startswith("transformers.")
        and not getattr(module.config, "is_encoder_decoder", False)
        and not any(block.state_values or block.float32_state_values for block in blocks)
    )


def _text_config(module: nn.Module) -> PretrainedConfig | None:
    config = getattr(module, "config", None)
    return config.get_text_config(decoder=True) if isinstance(config, PretrainedConfig) else None


def _output_embeddings(module: nn.Module) -> nn.Module | None:
    get_output_embeddings = getattr(module, "get_output_embeddings", None)
    head = get_output_embeddings() if callable(get_output_embeddings) else None
    return head if isinstance(head, nn.Module) else None


def _head_block(module: nn.Module, head: nn.Module | None, units: list[_Unit]) -> str | None:
    """The block holding the output head: the unit whose name is the longest prefix of the head's."""
    if head is None:
        return None
    head_name = next(name for name, candidate in module.named_modules() if candidate is head)
    holders = [
        unit.name
        for unit in units
        if not unit.direct_only and (not unit.name or head_name == unit.name or head_name.startswith(unit.name + "."))
    ]
    return max(holders, key=len, default=None)


def _vocab_size(head: nn.Module, config: PretrainedConfig | None) -> int:
    if isinstance(head, nn.Linear):
        return head.out_features
    return getattr(config, "vocab_size", 0) or 0


def _max_context(config: PretrainedConfig | None) -> int | None:
    for field in CONTEXT_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _model_name(module: nn.Module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "_name_or_path", "") or type(module).__name__


def _prevailing_dtype(module: nn.Module) -> torch.dtype:
    """The floating-point dtype most parameter values have now; float32 when there are none."""
    counts = Counter()
    for parameter in module.parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] += parameter.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32
