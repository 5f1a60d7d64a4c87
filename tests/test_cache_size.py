"""KV cache and fixed state per block: from full-size configs, and against the cache that
tiny random-weight instances of each architecture really allocate in a forward pass.
"""

from functools import cache

import pytest
import torch
from full_size import BF16, blocks_by_name, full_profile
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertModel,
    PretrainedConfig,
)

from devicemap.model.profile import Block, profile_module

# Per block, from full-size configs


@pytest.mark.parametrize(
    "name, layer, kv_values, window",
    [
        ("llama-3-8b", "model.layers.0", 2 * 8 * 128, None),
        ("llama-3.1-405b", "model.layers.125", 2 * 8 * 128, None),
        ("mixtral-8x7b", "model.layers.0", 2 * 8 * 128, None),
        ("qwen3-30b-a3b", "model.layers.47", 2 * 4 * 128, None),
        ("deepseek-v3", "model.layers.60", 512 + 64, None),  # the compressed latent and the rotary key
        ("mistral-7b", "model.layers.0", 2 * 8 * 128, 4096),
        ("gpt2", "transformer.h.0", 2 * 768, None),
        ("t5-small", "decoder.block.0", 2 * (2 * 8 * 64), None),  # self- and cross-attention
        ("t5-small", "encoder.block.0", 0, None),
        ("bert-base", "bert.encoder.layer.0", 0, None),
    ],
)
def test_each_layer_caches_what_its_attention_keeps_per_token(name, layer, kv_values, window):
    block = blocks_by_name(full_profile(name))[layer]
    assert (block.kv_values_per_token, block.kv_window, block.state_values) == (kv_values, window, 0)


def test_only_attention_layers_cache():
    profile = full_profile("llama-3-70b")
    assert [block.name for block in profile.blocks if block.kv_values_per_token] == [
        f"model.layers.{i}" for i in range(80)
    ]


def test_cache_bytes_cap_windowed_layers_and_size_float32_state_at_four_bytes():
    windowed = Block("layers.0", 0, kv_values_per_token=1024, kv_window=4096)
    assert windowed.cache_bytes(2, 1000, "bfloat16") == 2 * 1024 * 1000 * 2
    assert windowed.cache_bytes(2, 10_000, "bfloat16") == 2 * 1024 * 4096 * 2
    mixer = Block("layers.1", 0, state_values=640, float32_state_values=1024)
    assert mixer.cache_bytes(3, 10_000, "bfloat16") == 3 * (640 * 2 + 1024 * 4)


# KV cache: the profile against what tiny random-weight models really cache

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)  # fmt: skip
TINY = {
    "llama": ("llama", SMALL),
    "mistral-sliding": ("mistral", {**SMALL, "sliding_window": 4}),
    "gemma2-alternating": ("gemma2", {**SMALL, "sliding_window": 4, "head_dim": 16}),
    "mixtral": ("mixtral", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3-moe": ("qwen3_moe", {
        **SMALL, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "head_dim": 16,
    }),
    "deepseek-v3": ("deepseek_v3", {
        **SMALL, "num_key_value_heads": 4, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "kv_lora_rank": 16,
        "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    }),
    "deepseek-v3.2-sparse": ("deepseek_v32", {
        **SMALL, "num_key_value_heads": 4, "moe_intermediate_size": 32, "first_k_dense_replace": 1,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "kv_lora_rank": 16,
        "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "index_head_dim": 16,
        "index_n_heads": 2, "index_topk": 4,
    }),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100}),
    "t5": ("t5", {"d_model": 64, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4,
                  "d_kv": 8, "vocab_size": 100}),
    "qwen3-next-linear-attention": ("qwen3_next", {
        **SMALL, "num_hidden_layers": 4, "head_dim": 16, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
        "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
        "linear_value_head_dim": 8,
    }),
    "mamba": ("mamba", {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100, "state_size": 8}),
    "falcon-h1-hybrid": ("falcon_h1", {
        **SMALL, "head_dim": 16, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
        "mamba_n_groups": 1, "mamba_d_state": 8, "mamba_d_conv": 4,
    }),
}  # fmt: skip


@cache
def tiny_model(kind: str) -> nn.Module:
    model_type, fields = TINY[kind]
    config = AutoConfig.for_model(model_type, **fields)
    model_class = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    torch.manual_seed(0)
    return model_class.from_config(config, dtype=BF16).eval()


def measured_cache_bytes(model: nn.Module, batch_size: int, tokens: int) -> int:
    """Bytes of the storage a model's cache keeps alive once ``tokens`` tokens are in it.

    A prefill of ``tokens - 1`` tokens, then one decoding step, as ``generate`` runs.
    Storage is what counts: a sliding-window layer keeps a view into a wider tensor. An
    encoder-decoder model reads an encoder input as long as the decoder's.
    """
    vocab = model.config.get_text_config(decoder=True).vocab_size
    prompt = torch.randint(0, vocab, (batch_size, tokens - 1))
    step = torch.randint(0, vocab, (batch_size, 1))
    inputs = {}
    if model.config.is_encoder_decoder:
        inputs["input_ids"] = torch.randint(0, vocab, (batch_size, tokens))
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            first = model(**inputs, decoder_input_ids=prompt, use_cache=True)
            output = model(**inputs, decoder_input_ids=step, cache=first.cache, use_cache=True)
        else:
            first = model(input_ids=prompt, use_cache=True)
            output = model(input_ids=step, cache=first.cache, use_cache=True)
    return storage_bytes(output.cache)


def storage_bytes(cache_object) -> int:
    """Walk any cache object's attributes, lists and dicts; add up its floating-point storages once each.

    Integer tensors (a sliding window's length kept as a tensor) are bookkeeping, not cache.
    """
    storages, seen, pending = {}, set(), [cache_object]
    while pending:
        item = pending.pop()
        if isinstance(item, torch.Tensor):
            if item.is_floating_point():
                storage = item.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        if item is None or id(item) in seen or isinstance(item, (nn.Module, PretrainedConfig, str, int, float)):
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
        elif hasattr(item, "__dict__"):
            pending.extend(vars(item).values())
    return sum(storages.values())


def predicted_cache_bytes(model: nn.Module, batch_size: int, tokens: int) -> int:
    return sum(block.cache_bytes(batch_size, tokens, BF16) for block in profile_module(model).blocks)


@pytest.mark.parametrize("kind", TINY)
def test_the_profile_predicts_the_cache_a_forward_really_allocates(kind):
    model = tiny_model(kind)
    assert measured_cache_bytes(model, 2, 9) == predicted_cache_bytes(model, 2, 9) > 0


def test_a_sliding_window_layer_stops_growing_at_its_window():
    model = tiny_model("mistral-sliding")  # a window of 4 tokens
    full_window = measured_cache_bytes(model, 2, 4)
    assert measured_cache_bytes(model, 2, 3) < full_window
    assert measured_cache_bytes(model, 2, 12) == full_window == predicted_cache_bytes(model, 2, 12)


def test_a_state_space_models_cache_does_not_grow_with_tokens():
    model = tiny_model("mamba")
    assert all(block.kv_values_per_token == 0 for block in profile_module(model).blocks)
    short, long = measured_cache_bytes(model, 2, 3), measured_cache_bytes(model, 2, 17)
    assert short == long == predicted_cache_bytes(model, 2, 17)


def test_recurrent_states_are_float32_even_in_a_bfloat16_model():
    mixer = blocks_by_name(profile_module(tiny_model("mamba")))["backbone.layers.0"]
    # Mamba keeps conv inputs (128 channels × kernel 4) at bf16 and the SSM state (128 × 8) in float32.
    assert (mixer.state_values, mixer.float32_state_values) == (128 * 4, 128 * 8)


def test_an_encoder_only_model_caches_nothing():
    with torch.device("meta"):
        model = BertModel(BertConfig(num_hidden_layers=2))
    assert all(block.cache_bytes(4, 512, BF16) == 0 for block in profile_module(model).blocks)
