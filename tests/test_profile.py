"""Profiles: a model's blocks, their bytes at the load dtype, ties, KV cache and activations.

Full-size architectures are built from their published configs on the meta device (no
memory); the KV figures are checked against the cache a tiny random-weight instance of
each architecture really allocates.
"""

import json
from functools import cache

import pytest
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertModel,
    DeepseekV3Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3MoeConfig,
    T5Config,
)

from devicemap.errors import CheckpointError
from devicemap.profile import Block, profile_config, profile_module
from devicemap.skeleton import build_on_meta

BF16 = torch.bfloat16

FULL_SIZE = {
    "llama-3-8b": lambda: LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
    ),
    "llama-3-70b": lambda: LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
    ),
    "llama-3.1-405b": lambda: LlamaConfig(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
    ),
    "llama-3.2-1b": lambda: LlamaConfig(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
    ),
    "mixtral-8x7b": lambda: MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
    ),
    "qwen3-30b-a3b": lambda: Qwen3MoeConfig(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        vocab_size=151936, max_position_embeddings=40960,
    ),
    "deepseek-v3": DeepseekV3Config,
    "mistral-7b": lambda: MistralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, sliding_window=4096, vocab_size=32000,
    ),
    "gpt2": GPT2Config,
    "t5-small": T5Config,
    "bert-base": lambda: BertConfig(architectures=["BertForMaskedLM"]),
}  # fmt: skip


@cache
def meta_model(name: str, dtype: torch.dtype = BF16) -> nn.Module:
    return build_on_meta(FULL_SIZE[name](), dtype)


@cache
def full_profile(name: str, dtype: torch.dtype = BF16):
    return profile_config(FULL_SIZE[name](), dtype)


def blocks_by_name(profile) -> dict[str, Block]:
    return {block.name: block for block in profile.blocks}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as built, each shared tensor once."""
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


# Sizes


def test_llama_3_8b_weighs_16_06_gb_in_bfloat16():
    assert sum(block.weight_bytes for block in full_profile("llama-3-8b").blocks) == 16_060_522_496


@pytest.mark.parametrize("name", FULL_SIZE)
def test_weight_bytes_add_up_to_the_parameter_bytes_of_the_meta_model(name):
    assert sum(block.weight_bytes for block in full_profile(name).blocks) == parameter_bytes(meta_model(name))


@pytest.mark.parametrize("name", FULL_SIZE)
def test_every_tensor_of_the_model_is_in_exactly_one_block(name):
    model = meta_model(name)
    expected = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    expected += [n for n, _ in model.named_buffers(remove_duplicate=False)]
    listed = [tensor for block in full_profile(name).blocks for tensor in block.tensor_names]
    assert sorted(listed) == sorted(expected)


@pytest.mark.parametrize("name", FULL_SIZE)
def test_block_names_are_module_prefixes_of_their_tensors(name):
    profile = full_profile(name)
    module_names = set(profile.module_names)
    for block in profile.blocks:
        assert block.name in module_names
        assert all(tensor.startswith(block.name + ".") for tensor in block.tensor_names)


def test_deepseek_v3_is_671_billion_parameters_with_its_router_kept_in_float32():
    profile = full_profile("deepseek-v3")
    model = meta_model("deepseek-v3")
    assert sum(parameter.numel() for parameter in model.parameters()) == pytest.approx(671e9, rel=0.001)
    router = model.model.layers[3].mlp.gate.weight
    moe_layer = blocks_by_name(profile)["model.layers.3"]
    as_bf16 = sum(p.numel() * 2 for p in model.model.layers[3].parameters())
    assert moe_layer.weight_bytes == as_bf16 + router.numel() * 2


def test_t5_keeps_its_wo_projections_in_float32_only_under_float16():
    model = meta_model("t5-small", torch.float32)
    wo_values = sum(p.numel() for n, p in model.named_parameters() if ".wo." in n)
    float16 = sum(block.weight_bytes for block in profile_module(model, "float16").blocks)
    bfloat16 = sum(block.weight_bytes for block in profile_module(model, "bfloat16").blocks)
    assert float16 - bfloat16 == wo_values * 2


def test_integer_buffers_keep_their_dtype_at_any_load_dtype():
    model = meta_model("bert-base", torch.float32)
    embeddings = blocks_by_name(profile_module(model, "bfloat16"))["bert.embeddings"]
    position_ids, token_type_ids = model.bert.embeddings.position_ids, model.bert.embeddings.token_type_ids
    assert position_ids.dtype == token_type_ids.dtype == torch.int64
    assert embeddings.buffer_bytes == (position_ids.numel() + token_type_ids.numel()) * 8


def test_a_module_on_the_cpu_profiles_at_its_own_dtype_unless_told_otherwise():
    model = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 100)).to(torch.float16)
    assert profile_module(model).dtype == "float16"
    assert [block.weight_bytes for block in profile_module(model).blocks] == [1600, 1800]
    assert [block.weight_bytes for block in profile_module(model, "float32").blocks] == [3200, 3600]


# Blocks


def test_a_decoder_is_split_into_embeddings_whole_layers_norm_rotary_and_head():
    names = [block.name for block in full_profile("llama-3-8b").blocks]
    layers = [f"model.layers.{i}" for i in range(32)]
    assert names == ["model.embed_tokens", *layers, "model.norm", "model.rotary_emb", "lm_head"]


def test_encoder_decoder_blocks_follow_the_models_no_split_modules():
    names = [block.name for block in full_profile("t5-small").blocks]
    assert "encoder.block.5" in names and "decoder.block.5" in names
    assert not any(name.startswith("encoder.block.0.") for name in names)


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8)
        self.down = nn.Linear(8, 4)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.trunk = Trunk()
        self.layers = nn.ModuleList([Trunk(), Trunk()])
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int32), persistent=False)


def test_a_module_holding_tensors_beside_children_gets_a_block_for_just_those():
    blocks = profile_module(Toy()).blocks
    assert [block.name for block in blocks] == ["", "trunk.up", "trunk.down", "layers.0", "layers.1"]
    assert blocks[0].tensor_names == ("scale", "steps")
    assert (blocks[0].weight_bytes, blocks[0].buffer_bytes) == (16, 12)


def test_classes_named_no_split_are_kept_whole():
    names = [block.name for block in profile_module(Toy(), no_split={"Trunk"}).blocks]
    assert names == ["", "trunk", "layers.0", "layers.1"]


# Ties


@pytest.mark.parametrize(
    "name, tied",
    [
        ("gpt2", (("transformer.wte", "lm_head"),)),
        ("llama-3.2-1b", (("model.embed_tokens", "lm_head"),)),
        ("t5-small", (("shared", "encoder.embed_tokens", "decoder.embed_tokens", "lm_head"),)),
        ("llama-3-8b", ()),
    ],
)
def test_blocks_sharing_a_weight_are_grouped(name, tied):
    assert full_profile(name).tied == tied


def test_a_shared_weight_counts_once_in_the_first_block_of_its_group():
    blocks = blocks_by_name(full_profile("gpt2"))
    assert blocks["transformer.wte"].weight_bytes == 50257 * 768 * 2
    assert blocks["lm_head"].weight_bytes == 0
    assert blocks["lm_head"].tensor_names == ("lm_head.weight",)


# Head and context


def test_the_head_block_vocabulary_and_context_come_from_the_model():
    profile = full_profile("llama-3.1-405b")
    assert (profile.head, profile.vocab_size, profile.max_context) == ("lm_head", 128256, 131072)
    assert full_profile("gpt2").max_context == 1024


def test_a_model_without_output_head_has_none():
    profile = profile_module(build_on_meta_bert_model())
    assert (profile.head, profile.vocab_size) == (None, 0)


def build_on_meta_bert_model() -> nn.Module:
    with torch.device("meta"):
        return BertModel(BertConfig(num_hidden_layers=2))


# KV cache and fixed state, per block, from full-size configs


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
    model = tiny_model("mistral-sliding")
    assert measured_cache_bytes(model, 2, 3) < measured_cache_bytes(model, 2, 4)
    assert measured_cache_bytes(model, 2, 4) == measured_cache_bytes(model, 2, 12) == predicted_cache_bytes(model, 2, 12)


def test_a_state_space_models_cache_does_not_grow_with_tokens():
    model = tiny_model("mamba")
    assert all(block.kv_values_per_token == 0 for block in profile_module(model).blocks)
    assert measured_cache_bytes(model, 2, 3) == measured_cache_bytes(model, 2, 17) == predicted_cache_bytes(model, 2, 17)


def test_recurrent_states_are_float32_even_in_a_bfloat16_model():
    mixer = blocks_by_name(profile_module(tiny_model("mamba")))["backbone.layers.0"]
    # Mamba keeps conv inputs (128 channels × kernel 4) at bf16 and the SSM state (128 × 8) in float32.
    assert (mixer.state_values, mixer.float32_state_values) == (128 * 4, 128 * 8)


def test_an_encoder_only_model_caches_nothing():
    with torch.device("meta"):
        model = BertModel(BertConfig(num_hidden_layers=2))
    assert all(block.cache_bytes(4, 512, BF16) == 0 for block in profile_module(model).blocks)


# Activations


def test_a_dense_layer_peaks_in_its_mlp_with_the_residual_alive():
    layer = blocks_by_name(full_profile("llama-3-8b"))["model.layers.0"]
    gate = up = 14336
    assert layer.activation_bytes_per_token == (2 * 4096 + (gate + up + 4096) + gate) * 2


def test_routed_experts_count_once_for_every_expert_a_token_is_sent_to():
    def moe_activation(experts_per_token: int) -> int:
        config = FULL_SIZE["mixtral-8x7b"]()
        config.num_experts_per_tok = experts_per_token
        return blocks_by_name(profile_config(config, BF16))["model.layers.0"].activation_bytes_per_token

    one_copy = (2 * 14336 + 14336 + 2 * 14336) * 2  # gate_up, down, and the widest once more
    assert moe_activation(2) - moe_activation(1) == one_copy


def test_the_heads_logits_are_left_to_the_planner():
    assert blocks_by_name(full_profile("llama-3-8b"))["lm_head"].activation_bytes_per_token == 0


# From a folder or a config.json


def test_a_folder_and_its_config_json_give_the_same_profile(tmp_path):
    FULL_SIZE["llama-3-8b"]().save_pretrained(tmp_path / "Llama-3-8B")
    from_folder = profile_config(tmp_path / "Llama-3-8B", "bfloat16")
    from_file = profile_config(str(tmp_path / "Llama-3-8B" / "config.json"), "bfloat16")
    assert from_folder == from_file
    assert from_folder.name == "Llama-3-8B"
    assert from_folder.blocks == full_profile("llama-3-8b").blocks


def test_the_dtype_defaults_to_the_configs_then_float32(tmp_path):
    config = FULL_SIZE["gpt2"]()
    config.save_pretrained(tmp_path / "fp32")
    config.dtype = "bfloat16"
    config.save_pretrained(tmp_path / "bf16")
    assert profile_config(tmp_path / "bf16").dtype == "bfloat16"
    assert profile_config(tmp_path / "fp32").dtype == "float32"


def test_profiling_a_config_object_leaves_it_untouched():
    config = FULL_SIZE["gpt2"]()
    before = config.to_dict()
    profile_config(config, "float16")
    assert config.to_dict() == before


def test_a_missing_folder_is_an_error_naming_it(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist.*config.json"):
        profile_config(tmp_path / "no-such-model")


def test_a_folder_without_config_json_is_an_error_saying_what_is_missing(tmp_path):
    with pytest.raises(CheckpointError, match=f"{tmp_path.name}.*has no config.json"):
        profile_config(tmp_path)


@pytest.mark.parametrize(
    "content, says",
    [
        ({"model_type": "no_such_architecture"}, "no_such_architecture.*trust_remote_code=True"),
        ({"hidden_size": 64}, "model_type"),
        ("{not json", "not a valid JSON"),
    ],
)
def test_a_config_transformers_cannot_read_is_an_error_saying_why(tmp_path, content, says):
    (tmp_path / "config.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(CheckpointError, match=says):
        profile_config(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
