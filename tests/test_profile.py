"""Profiles: a model's blocks, their bytes at the load dtype, ties, head and activations.

Full-size architectures come from their published configs, built on the meta device.
"""

import json

import pytest
import torch
from full_size import BF16, FULL_SIZE, blocks_by_name, full_profile, meta_model, parameter_bytes
from torch import nn
from transformers import BertConfig, BertModel

from devicemap.errors import CheckpointError
from devicemap.model.profile import profile_config, profile_module

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
    with torch.device("meta"):
        model = BertModel(BertConfig(num_hidden_layers=2))
    profile = profile_module(model)
    assert (profile.head, profile.vocab_size) == (None, 0)

# Activations


def test_a_dense_layer_peaks_in_its_mlp_with_four_hidden_states_alive():
    # The embeddings' output, the layer's input, the residual sum and the MLP's normalised input.
    layer = blocks_by_name(full_profile("llama-3-8b"))["model.layers.0"]
    gate = up = 14336
    assert layer.activation_bytes_per_token == (4 * 4096 + (gate + up + 4096) + gate) * 2


def test_routed_experts_count_once_for_every_expert_a_token_is_sent_to():
    def moe_activation(experts_per_token: int) -> int:
        config = FULL_SIZE["mixtral-8x7b"]()
        config.num_experts_per_tok = experts_per_token
        return blocks_by_name(profile_config(config, BF16))["model.layers.0"].activation_bytes_per_token

    one_copy = (4096 + 2 * 14336 + 14336 + 2 * 14336) * 2  # its gathered input, gate_up, down, the widest again
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
