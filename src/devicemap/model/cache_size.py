"""What each block of a transformers model caches per sequence while it generates.

The figures follow the cache transformers itself builds for ``generate`` (a
``DynamicCache`` laid out from the config), so that a plan reserves what will really
be allocated:

- attention layers cache keys and values for every token:
  ``2 × num_key_value_heads × head_dim`` values (multi-head and grouped-query alike;
  GPT-2's fused ``c_attn`` and T5's ``d_kv`` come out of the same config fields);
- sliding-window and chunked layers hold ``sliding_window`` tokens while decoding:
  ``DynamicSlidingWindowLayer`` concatenates the new token to the last
  ``sliding_window - 1`` and keeps a view of those, so the storage it keeps alive is one
  token wider than what it exposes. Right after a prefill longer than the window, the
  view still holds the whole prompt's keys and values alive, until the first generated
  token replaces them; devicemap's dispatch copies the window out as soon as the
  layer's block has run (``sliding``), so that a window is all a plan must reserve;
- multi-head latent attention (DeepSeek-V2/V3) caches the compressed latent and the
  shared rotary key, ``kv_lora_rank + qk_rope_head_dim`` values, and expands them to
  per-head keys and values on every forward;
- a decoder layer with cross-attention (T5, BART) also caches the encoder's keys and
  values; they are counted per token as if the encoder input were as long as the
  sequence budget, an upper bound for prompts no longer than ``max_tokens``;
- sparse-attention layers (DeepSeek-V3.2) add the indexer's key, ``index_head_dim``
  values per token;
- state-space and linear-attention mixers (Mamba, Mamba-2, gated delta rule) keep a
  fixed state per sequence: the convolution's last ``kernel`` inputs per channel, at the
  model's dtype, and a recurrent state that their code keeps in float32;
- encoder layers (bidirectional attention) and models that cannot generate cache nothing.

A forward that adds tokens to a cache already holding some (every prefill chunk after the
first) also reads the cached tokens back, and that allocates per cached token: the cache
layer's concatenation makes a new copy of its keys and values; grouped-query keys and
values are repeated to every query head, as SDPA is handed a mask then and so cannot share
them; a latent cache is expanded to per-head keys and values. ``context_values_per_token``
counts those values.

Layers are matched to blocks by the ``layer_idx`` their attention or mixer module
carries, which is the index the model itself uses to address the cache.

A model that ships its own code (``trust_remote_code``, e.g. ChatGLM2) has neither
``layer_idx`` nor the usual config fields, and keeps its cache in its own layout. Its
cache is measured instead: one forward of a few tokens on the device its weights are on
(the meta device while planning: nothing computed, nothing allocated), and each entry of
the returned cache, one per layer of the model's repeated layer list, gives that layer's
values per token.
"""

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from ..errors import DeviceMapError

ATTENTION_LAYER_TYPES = frozenset(
    {"full_attention", "sliding_attention", "chunked_attention", "indexed_attention", "hybrid", "hybrid_sliding"}
)
STATE_LAYER_TYPES = frozenset({"linear_attention", "conv", "hybrid", "hybrid_sliding"})


@dataclass(frozen=True)
class BlockCache:
    """What one block caches per sequence, in values (the cache dtype sizes them)."""

    kv_values_per_token: int = 0
    kv_window: int | None = None
    state_values: int = 0
    float32_state_values: int = 0
    context_values_per_token: int = 0


NO_CACHE = BlockCache()

# Tokens in the forward that measures a remote-code model's cache; any count above one tells
# per-token storage from a fixed size.
PROBE_TOKENS = 4


def block_caches(model: nn.Module, blocks: Sequence[nn.Module | None]) -> list[BlockCache]:
    """Per block, what ``model.generate`` caches for it; ``None`` stands for a block with no modules.

    >>> import transformers
    >>> config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
    ...                                   num_key_value_heads=2, intermediate_size=128, vocab_size=100)
    >>> with torch.device("meta"):
    ...     llama = transformers.LlamaForCausalLM(config)
    >>> [cache.kv_values_per_token for cache in block_caches(llama, [llama.model.embed_tokens, llama.model.layers[0]])]
    [0, 64]
    """
    config = _decoder_config(model)
    if config is None or not _can_generate(model):
        return [NO_CACHE] * len(blocks)
    if _ships_own_code(model):
        return _measured_caches(model, blocks)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    layer_configs = config.per_layer_config

    def layer_cache(index: int, modules: list[nn.Module]) -> BlockCache:
        if index >= len(layer_types):
            return _layer_cache("full_attention", {}, config, modules)
        return _layer_cache(layer_types[index], layer_kwargs[index], layer_configs[index], modules)

    caches = []
    for block in blocks:
        layers = _cache_layers(block) if block is not None else {}
        caches.append(_combine([layer_cache(index, modules) for index, modules in layers.items()]))
    return caches


def _decoder_config(model: nn.Module) -> PretrainedConfig | None:
    config = getattr(model, "config", None)
    if not isinstance(config, PretrainedConfig):
        return None
    return config.get_text_config(decoder=True)


def _can_generate(model: nn.Module) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return callable(can_generate) and bool(can_generate())


def _ships_own_code(model: nn.Module) -> bool:
    return not type(model).__module__.startswith("transformers.")


def _measured_caches(model: nn.Module, blocks: Sequence[nn.Module | None]) -> list[BlockCache]:
    """Each block caches what the layers of the model's layer list inside it returned per token."""
    per_layer = measure_values_per_token(model)
    layers = _layer_list(model, len(per_layer))
    caches = []
    for block in blocks:
        inside = {id(module) for module in block.modules()} if block is not None else set()
        values = sum(count for layer, count in zip(layers, per_layer) if id(layer) in inside)
        caches.append(BlockCache(kv_values_per_token=values))
    return caches


def measure_values_per_token(model: nn.Module) -> list[int]:
    """Per cache layer, the values ``model`` caches per token, read from a forward of a few tokens.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> measure_values_per_token(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=16)))
    [16, 16]
    """
    device = next(model.parameters()).device
    probe = torch.zeros((1, PROBE_TOKENS), dtype=torch.long, device=device)
    try:
        with torch.no_grad():
            output = model(input_ids=probe, use_cache=True)
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DeviceMapError(
            f"cannot measure the KV cache of {type(model).__name__} (its modeling code ships with the model): "
            f"a forward of {PROBE_TOKENS} tokens on {device} failed: {reason}. Plan it from a copy of the model "
            "built on the CPU (an nn.Module), whose forward runs"
        ) from error
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    if cache is None:
        raise DeviceMapError(
            f"{type(model).__name__} returned no cache from a forward with use_cache=True, so its KV cache "
            "cannot be sized; plan it with a Workload of one token, or reserve the cache with max_memory"
        )
    entries = cache.layers if isinstance(cache, Cache) else cache
    return [sum(tensor.numel() for tensor in _tensors(entry)) // PROBE_TOKENS for entry in entries]


def _tensors(entry: object) -> list[torch.Tensor]:
    if isinstance(entry, torch.Tensor):
        return [entry]
    if isinstance(entry, (tuple, list)):
        return [tensor for item in entry for tensor in _tensors(item)]
    return [value for value in vars(entry).values() if isinstance(value, torch.Tensor)]


def _layer_list(model: nn.Module, count: int) -> list[nn.Module]:
    """The model's repeated layers: the first module list as long as its cache."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return list(module)
    raise DeviceMapError(
        f"{type(model).__name__} returned a cache of {count} layers but holds no list of {count} layers, so "
        "its KV cache cannot be matched to its blocks; plan it with a Workload of one token"
    )


def cache_layer_indices(block: nn.Module) -> tuple[int, ...]:
    """The indices of the cache layers ``block`` writes, as the model addresses its cache.

    >>> import transformers
    >>> with torch.device("meta"):
    ...     llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64,
    ...                                           num_attention_heads=4, intermediate_size=128, vocab_size=100))
    >>> cache_layer_indices(llama.model.layers[1])
    (1,)
    """
    return tuple(sorted(_cache_layers(block)))


def _cache_layers(block: nn.Module) -> dict[int, list[nn.Module]]:
    """The cache layers a block writes, each with the modules that write it.

    Only the innermost module carrying a ``layer_idx`` counts (a decoder layer may carry
    its attention's index too). A block whose attention is all bidirectional is an
    encoder layer and caches nothing.
    """
    indexed = [module for module in block.modules() if isinstance(getattr(module, "layer_idx", None), int)]
    innermost = [module for module in indexed if next(_indexed_below(module), None) is None]
    if all(getattr(module, "is_causal", True) is False for module in innermost):
        return {}
    layers: dict[int, list[nn.Module]] = {}
    for module in innermost:
        layers.setdefault(module.layer_idx, []).append(module)
    return layers


def _indexed_below(module: nn.Module):
    for child in module.modules():
        if child is not module and isinstance(getattr(child, "layer_idx", None), int):
            yield child


def _layer_cache(layer_type: str, kwargs: dict, config: PretrainedConfig, modules: list[nn.Module]) -> BlockCache:
    kv_values = window = context_values = 0
    if layer_type in ATTENTION_LAYER_TYPES:
        attention_modules = [module for module in modules if _conv(module) is None]
        # Cross-attention sits beside self-attention under the same index (T5, BART).
        kv_values = _attention_values_per_token(config) * max(1, len(attention_modules))
        context_values = _context_values_per_token(config) * max(1, len(attention_modules))
        window = kwargs.get("sliding_window", 0)
    if layer_type == "indexed_attention":
        # Sparse attention (DeepSeek-V3.2) also caches one key per token for its indexer.
        kv_values += config.index_head_dim
    state = float32_state = 0
    if layer_type in STATE_LAYER_TYPES:
        mixers = [module for module in modules if _conv(module) is not None]
        state = sum(_conv_state_values(mixer) for mixer in mixers)
        float32_state = sum(_recurrent_state_values(mixer) for mixer in mixers)
    return BlockCache(kv_values, window or None, state, float32_state, context_values)


def _attention_values_per_token(config: PretrainedConfig) -> int:
    """Keys plus values one attention layer caches per token."""
    latent_rank = getattr(config, "kv_lora_rank", None)
    if latent_rank:
        return latent_rank + config.qk_rope_head_dim
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or config.hidden_size // heads
    return 2 * kv_heads * head_dim


def _context_values_per_token(config: PretrainedConfig) -> int:
    """Values one attention layer allocates per cached token when it adds tokens to a non-empty cache."""
    cached = _attention_values_per_token(config)
    heads = config.num_attention_heads
    if getattr(config, "kv_lora_rank", None):
        # kv_b_proj's output, then the keys built beside it with the shared rotary part.
        expanded = heads * (config.qk_nope_head_dim + config.v_head_dim)
        return cached + expanded + heads * (config.qk_nope_head_dim + config.qk_rope_head_dim)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return cached + (cached * heads // kv_heads if kv_heads < heads else 0)


def _conv(mixer: nn.Module) -> nn.Conv1d | None:
    return next((child for child in mixer.children() if isinstance(child, nn.Conv1d)), None)


def _conv_state_values(mixer: nn.Module) -> int:
    """The causal convolution keeps its last ``kernel`` inputs for every channel."""
    conv = _conv(mixer)
    return conv.out_channels * conv.kernel_size[0]


def _recurrent_state_values(mixer: nn.Module) -> int:
    """The recurrent state, laid out as each mixer family's code allocates it."""
    a_log = getattr(mixer, "A_log", None)
    # Mamba: a state vector per channel, shaped like A_log (channels × state size).
    if isinstance(a_log, torch.Tensor) and a_log.dim() == 2:
        return a_log.numel()
    # Gated delta rule (Qwen3-Next): a key-dim × value-dim matrix per value head.
    if hasattr(mixer, "num_v_heads"):
        return mixer.num_v_heads * mixer.head_k_dim * mixer.head_v_dim
    # Mamba-2 (and the hybrids built on it): a head-dim × state-size matrix per head.
    if hasattr(mixer, "ssm_state_size"):
        return mixer.num_heads * mixer.head_dim * mixer.ssm_state_size
    return 0


def _combine(layers: list[BlockCache]) -> BlockCache:
    """One block's cache from its layers'. A window holds only when every attention layer has one."""
    if not layers:
        return NO_CACHE
    attention = [layer for layer in layers if layer.kv_values_per_token]
    windows = [layer.kv_window for layer in attention]
    return BlockCache(
        kv_values_per_token=sum(layer.kv_values_per_token for layer in attention),
        kv_window=max(windows) if windows and None not in windows else None,
        state_values=sum(layer.state_values for layer in layers),
        float32_state_values=sum(layer.float32_state_values for layer in layers),
        context_values_per_token=sum(layer.context_values_per_token for layer in attention),
    )
