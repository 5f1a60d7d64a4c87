"""Models that ship their own modeling code (config.json's auto_map), planned and loaded like any other."""

import json

import psutil
import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import devicemap
from devicemap.cli import main
from devicemap.errors import CheckpointError, PipelineError
from devicemap.model.profile import profile_config
from devicemap.pipeline import Pipeline
from devicemap.planning.planner import make_plan
from devicemap.workload import Workload
from remote_models import write_chatglm2, write_gpt2_style, write_llama_style

PROMPT = torch.tensor([[5, 9, 3, 7, 11]])
NEW_TOKENS = 8

# The two-GPU walkthrough's manual map for ChatGLM2-6B, with "disk" and "cpu" for the GPUs.
CHATGLM2_WALKTHROUGH_MAP = {
    "transformer.embedding.word_embeddings": "cpu",
    "transformer.rotary_pos_emb": "disk",
    "transformer.encoder.layers.0": "cpu",
    "transformer.encoder.layers.1": "disk",
    "transformer.encoder.layers.2": "cpu",
    "transformer.encoder.layers.3": "disk",
    "transformer.encoder.final_layernorm": "cpu",
    "transformer.output_layer": "disk",
}
GPT2_STYLE_MAP = {"transformer.wte": "cpu", "transformer.wpe": "disk", "transformer.h.0": "disk",
                  "transformer.h": "cpu", "transformer.ln_f": "disk", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def chatglm2(tmp_path_factory):
    return write_chatglm2(tmp_path_factory.mktemp("remote") / "chatglm2")


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory):
    return write_gpt2_style(tmp_path_factory.mktemp("remote") / "gpt2_style")


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    return write_llama_style(tmp_path_factory.mktemp("remote") / "llama_style")


def plain_tokens(folder):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    return model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_chatglm2_blocks_are_its_layers_with_rotary_embedding_a_block_of_its_own(chatglm2):
    names = [block.name for block in profile_config(chatglm2, trust_remote_code=True).blocks]
    assert names == [
        "transformer.embedding.word_embeddings",
        "transformer.rotary_pos_emb",
        *(f"transformer.encoder.layers.{index}" for index in range(4)),
        "transformer.encoder.final_layernorm",
        "transformer.output_layer",
    ]


def test_chatglm2_kv_cache_per_layer_is_measured_from_its_multi_query_cache(chatglm2):
    blocks = profile_config(chatglm2, trust_remote_code=True).blocks
    # Keys and values of multi_query_group_num=2 groups of kv_channels=8, not of 4 heads.
    assert {block.name: block.kv_values_per_token for block in blocks if block.kv_values_per_token} == {
        f"transformer.encoder.layers.{index}": 2 * 2 * 8 for index in range(4)
    }


def test_a_model_with_its_own_code_is_planned_for_whole_prompts_as_generate_cannot_chunk_its_cache(chatglm2):
    plan = make_plan(profile_config(chatglm2, trust_remote_code=True), {"cpu": 2**30}, Workload(1, 4096))
    assert plan.prefill_chunk is None
    assert any("does not prefill in chunks" in reason for reason in plan.reasons)


def test_gpt2_style_kv_cache_per_layer_is_measured(gpt2_style):
    blocks = profile_config(gpt2_style, trust_remote_code=True).blocks
    assert {block.name: block.kv_values_per_token for block in blocks if block.kv_values_per_token} == {
        f"transformer.h.{index}": 2 * 32 for index in range(4)
    }


@pytest.mark.parametrize("call", [devicemap.plan, devicemap.load])
def test_folder_with_its_own_code_is_refused_without_trust_remote_code(chatglm2, call):
    with pytest.raises(CheckpointError, match="ships its own modeling code.*pass trust_remote_code=True"):
        call(chatglm2)


def test_chatglm2_walkthrough_manual_map_generates_the_plain_models_tokens(chatglm2, tmp_path):
    model = devicemap.load(chatglm2, trust_remote_code=True, device_map=CHATGLM2_WALKTHROUGH_MAP,
                           offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    generated = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, plain_tokens(chatglm2))


def test_chatglm2_planned_with_little_cpu_spills_to_disk_and_generates_the_plain_models_tokens(chatglm2, tmp_path):
    workload = devicemap.Workload(max_tokens=32)
    plan = devicemap.plan(chatglm2, trust_remote_code=True, max_memory={"cpu": "130KiB"}, workload=workload,
                          offload_folder=tmp_path)
    assert "disk" in plan.device_map.values()
    model = devicemap.load(chatglm2, trust_remote_code=True, device_map=plan, offload_folder=tmp_path)
    generated = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, plain_tokens(chatglm2))


def test_gpt2_style_manual_map_generates_the_plain_models_tokens(gpt2_style, tmp_path):
    model = devicemap.load(gpt2_style, trust_remote_code=True, device_map=GPT2_STYLE_MAP, offload_folder=tmp_path)
    generated = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(generated, plain_tokens(gpt2_style))


def test_auto_map_naming_only_auto_model_resolves_through_auto_model(tmp_path):
    folder = write_chatglm2(tmp_path / "chatglm2_auto_model_only")
    config = json.loads((folder / "config.json").read_text())
    del config["auto_map"]["AutoModelForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    model = devicemap.load(folder, trust_remote_code=True, device_map="cpu")
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False), plain_tokens(folder))


@pytest.mark.slow
def test_a_llama_shipping_its_own_code_runs_that_code_in_two_stages_and_equals_its_generate(llama_style):
    shipped = AutoModelForCausalLM.from_pretrained(llama_style, trust_remote_code=True).eval()
    with Pipeline(llama_style, stages=2, device="cpu", threads_per_stage=1, timeout_s=60,
                  trust_remote_code=True) as pipe:  # fmt: skip
        output = pipe.generate(PROMPT, max_new_tokens=NEW_TOKENS)
    assert torch.equal(output, shipped.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False))
    # transformers' own Llama, which runs without trust_remote_code, computes other tokens.
    builtin = AutoModelForCausalLM.from_pretrained(llama_style).eval()
    assert not torch.equal(output, builtin.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False))


def test_a_pipeline_of_a_model_shipping_code_it_cannot_split_is_refused_before_any_process_starts(gpt2_style):
    children = set(psutil.Process().children(recursive=True))
    with pytest.raises(CheckpointError, match="ships its own modeling code.*pass trust_remote_code=True"):
        Pipeline(gpt2_style, stages=2, device="cpu")
    with pytest.raises(PipelineError, match="model type 'tinygpt' is not supported"):
        Pipeline(gpt2_style, stages=2, device="cpu", trust_remote_code=True)
    assert set(psutil.Process().children(recursive=True)) == children


@pytest.mark.parametrize("pipeline", [[], ["--pipeline", "2"]], ids=["device-map", "pipeline"])
def test_the_command_line_plans_a_model_shipping_its_own_code_only_with_trust_remote_code(
    gpt2_style, pipeline, capsys
):
    budgets = "0=1GiB,1=1GiB" if pipeline else "cpu=1GiB"
    command = ["plan", str(gpt2_style), "--max-memory", budgets, "--json", *pipeline]
    assert main(command) == 2
    assert "ships its own modeling code" in capsys.readouterr().err
    assert main([*command, "--trust-remote-code"]) == 0
    assert "transformer.h.3" in capsys.readouterr().out
