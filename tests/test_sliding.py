"""Sliding-window cache layers hold no more than their window once their block has run."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from devicemap import dispatch

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)  # fmt: skip
WINDOWED = {
    "mistral": {"sliding_window": 4},
    "gemma2": {"sliding_window": 4, "head_dim": 16},  # sliding and full attention in turn
}
PROMPT = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))


def tiny(model_type: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **SMALL, **WINDOWED.get(model_type, {}))
    return AutoModelForCausalLM.from_config(config).eval()


def cache_after_prefill(model: torch.nn.Module):
    output = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=1, do_sample=False,
                            return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    return output.cache


def sliding_layers(cache) -> list:
    layers = [layer for layer in cache.layers if getattr(layer, "is_sliding", False)]
    assert layers, "the model has sliding-window layers"
    return layers


@pytest.mark.parametrize("model_type", WINDOWED)
def test_without_devicemap_a_long_prefill_leaves_sliding_layers_holding_the_whole_prompt(model_type):
    for layer in sliding_layers(cache_after_prefill(tiny(model_type))):
        assert layer.keys.shape[-2] == 3
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes * 20 // 3


@pytest.mark.parametrize("model_type", WINDOWED)
def test_after_a_dispatched_prefill_each_sliding_layer_holds_only_its_window(model_type):
    cache = cache_after_prefill(dispatch(tiny(model_type), "cpu"))
    for layer in sliding_layers(cache):
        assert layer.keys.shape[-2] == 3
        assert layer.keys.untyped_storage().nbytes() == layer.keys.nbytes
        assert layer.values.untyped_storage().nbytes() == layer.values.nbytes
    full = [layer for layer in cache.layers if not getattr(layer, "is_sliding", False)]
    assert all(layer.keys.shape[-2] == 20 for layer in full)


@pytest.mark.parametrize("model_type", WINDOWED)
def test_trimmed_windows_generate_the_same_tokens_as_the_plain_model(model_type):
    arguments = dict(attention_mask=torch.ones_like(PROMPT), max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = tiny(model_type).generate(PROMPT, **arguments)
    assert torch.equal(dispatch(tiny(model_type), "cpu").generate(PROMPT, **arguments), expected)


def test_a_model_without_sliding_windows_gets_no_hook_after_its_blocks():
    model = dispatch(tiny("llama"), "cpu")
    assert all(not layer._forward_hooks for layer in model.model.layers)
