"""Chunked prefill: plans reserve activations for one chunk, and generate prefills in those chunks, exactly."""

import pytest
import torch
from full_size import full_profile
from models import build_random_model
from transformers import AutoConfig, AutoModelForCausalLM

from devicemap import dispatch
from devicemap.errors import DeviceMapError, DoesNotFitError
from devicemap.model.profile import profile_config, profile_module
from devicemap.planning.planner import make_plan
from devicemap.planning.stages import split_stages
from devicemap.runtime.load import load
from devicemap.workload import DEFAULT_PREFILL_CHUNK, Workload

GiB = 2**30
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)  # fmt: skip
WINDOWED = {"mistral": {"sliding_window": 6}, "gemma2": {"sliding_window": 6, "head_dim": 16}}
CHUNK = 7


def tiny(kind: str) -> torch.nn.Module:
    if kind not in WINDOWED:
        return build_random_model(kind)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **SMALL, **WINDOWED[kind])).eval()


def padded_prompts() -> dict[str, torch.Tensor]:
    """Two prompts of 40 tokens, the second left-padded by 7, so every chunk after the first needs a mask."""
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    ids[1, :7], mask[1, :7] = 0, 0
    return {"input_ids": ids, "attention_mask": mask}


def greedy(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**padded_prompts(), max_new_tokens=8, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("kind", ["llama", "qwen3-moe", "mistral", "gemma2"])
def test_a_chunked_prefill_generates_the_tokens_of_a_whole_one(kind):
    model = tiny(kind)
    whole = greedy(model)
    plan = make_plan(profile_module(model), {"cpu": GiB}, Workload(2, 64, prefill_chunk=CHUNK))
    dispatch(model, plan)
    assert model.generation_config.prefill_chunk_size == CHUNK
    assert torch.equal(greedy(model), whole)


def test_load_has_generate_prefill_in_the_plans_chunks_with_the_tokens_of_a_whole_prefill(random_model_folder):
    folder = random_model_folder("llama")
    whole = greedy(load(folder, device_map="cpu", workload=Workload(2, 64, prefill_chunk=0)))
    model = load(folder, device_map="cpu", workload=Workload(2, 64, prefill_chunk=CHUNK))
    assert model.devicemap_plan.prefill_chunk == CHUNK
    assert model.generation_config.prefill_chunk_size == CHUNK
    assert torch.equal(greedy(model), whole)


def test_a_plan_for_whole_prompts_leaves_generate_unchunked(random_model_folder):
    model = load(random_model_folder("llama"), device_map="cpu", workload=Workload(2, 64, prefill_chunk=0))
    assert model.devicemap_plan.prefill_chunk is None
    assert model.generation_config.prefill_chunk_size is None
    assert "prefill whole" in str(model.devicemap_plan)


def test_a_chunk_as_long_as_the_sequence_is_a_whole_prefill():
    profile = full_profile("llama-3-8b")
    plan = make_plan(profile, {"cuda:0": 80 * GiB}, Workload(1, 1024, prefill_chunk=4096))
    whole = make_plan(profile, {"cuda:0": 80 * GiB}, Workload(1, 1024, prefill_chunk=0))
    assert plan.prefill_chunk is None
    assert plan.ledger == whole.ledger


def test_the_default_workload_prefills_in_the_default_chunk():
    plan = make_plan(full_profile("llama-3-8b"), {"cuda:0": 80 * GiB}, Workload(4, 8192))
    assert plan.workload.prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert plan.prefill_chunk == DEFAULT_PREFILL_CHUNK
    assert f"prefill in chunks of {DEFAULT_PREFILL_CHUNK:,} tokens" in str(plan)
    assert any("generation_config.prefill_chunk_size" in reason for reason in plan.reasons)


def test_a_plan_reserves_activations_for_one_chunk_with_the_later_chunks_mask_and_cache_reads():
    profile = full_profile("llama-3-70b")
    budgets = {f"cuda:{i}": 80 * GiB for i in range(8)}
    whole = make_plan(profile, budgets, Workload(4, 8192, prefill_chunk=0)).ledger[0]
    chunked = make_plan(profile, budgets, Workload(4, 8192, prefill_chunk=2048)).ledger[0]
    layer = next(block for block in profile.blocks if block.name == "model.layers.0")
    one_chunk = layer.activation_bytes_per_token * 4 * 2048
    mask = 4 * 2048 * 8192 * (1 + 2)  # a boolean mask and its bfloat16 bias
    cache_reads = 4 * 8192 * layer.context_values_per_token * 2
    assert whole.activation_bytes == layer.activation_bytes_per_token * 4 * 8192
    assert chunked.activation_bytes == one_chunk + mask + cache_reads
    assert chunked.activation_bytes < whole.activation_bytes / 2


def test_grouped_query_attention_reads_the_cache_back_repeated_to_every_query_head():
    layer = next(block for block in full_profile("llama-3-70b").blocks if block.name == "model.layers.0")
    # 8 key-value heads of 128 cached, and repeated to 64 query heads: keys and values each.
    assert layer.kv_values_per_token == 2 * 8 * 128
    assert layer.context_values_per_token == 2 * 8 * 128 + 2 * 64 * 128


def test_a_workload_that_did_not_fit_two_16_gib_gpus_fits_them_prefilled_in_chunks():
    profile = full_profile("llama-3-8b")
    budgets = {"cuda:0": 16 * GiB, "cuda:1": 16 * GiB}
    with pytest.raises(DoesNotFitError):
        make_plan(profile, budgets, Workload(4, 16_384, prefill_chunk=0), offload=False)
    plan = make_plan(profile, budgets, Workload(4, 16_384), offload=False)
    assert not plan.offloaded()
    assert plan.sequences_that_fit >= 4


def test_chunks_leave_more_room_for_sequences_on_the_same_gpus():
    profile = full_profile("llama-3-70b")
    budgets = {f"cuda:{i}": 80 * GiB for i in range(8)}
    whole = make_plan(profile, budgets, Workload(4, 8192, prefill_chunk=0))
    chunked = make_plan(profile, budgets, Workload(4, 8192))
    assert chunked.sequences_that_fit > whole.sequences_that_fit


def test_an_encoder_decoder_is_planned_for_its_whole_prefill_and_says_so():
    profile = profile_config(AutoConfig.for_model("t5"), torch.float32)
    plan = make_plan(profile, {"cpu": 64 * GiB}, Workload(1, 4096))
    whole = make_plan(profile, {"cpu": 64 * GiB}, Workload(1, 4096, prefill_chunk=0))
    assert not profile.chunked_prefill
    assert plan.prefill_chunk is None
    assert plan.ledger == whole.ledger
    assert any("does not prefill in chunks" in reason for reason in plan.reasons)


def test_pipeline_stages_reserve_activations_for_whole_prompts():
    profile = full_profile("llama-3-8b")
    stage_plan = split_stages(profile, [80 * GiB, 80 * GiB], Workload(4, 8192))
    whole = split_stages(profile, [80 * GiB, 80 * GiB], Workload(4, 8192, prefill_chunk=0))
    assert stage_plan.workload.prefill_chunk == 0
    assert stage_plan.stages == whole.stages
    assert "prefill whole" in str(stage_plan)


def test_a_plan_read_back_from_json_keeps_its_chunk():
    plan = make_plan(full_profile("llama-3-8b"), {"cuda:0": 80 * GiB}, Workload(4, 8192, prefill_chunk=1024))
    again = type(plan).from_json(plan.to_json())
    assert again.prefill_chunk == 1024
    assert again.ledger == plan.ledger


@pytest.mark.parametrize("chunk", [-1, 1.5, True])
def test_a_prefill_chunk_that_is_not_a_whole_number_of_tokens_is_refused(chunk):
    with pytest.raises(DeviceMapError, match="prefill_chunk"):
        Workload(prefill_chunk=chunk)
