"""With no workload given, a plan is for the longest default sequence that fits; past it, a run warns."""

import warnings

import pytest
import torch
from transformers import AutoTokenizer

import devicemap
from devicemap.errors import DoesNotFitError
from devicemap.model.profile import Block, Profile
from devicemap.planning.planner import MIN_DEFAULT_TOKENS, make_plan
from devicemap.runtime.load import load
from devicemap.workload import DEFAULT_MAX_TOKENS, Workload

MiB = 2**20
KV_PER_TOKEN = 1000  # float32 values: 4,000 bytes of KV cache per token per layer


def layers(count: int = 4, weight_bytes: int = MiB) -> Profile:
    blocks = tuple(Block(f"layers.{i}", weight_bytes, kv_values_per_token=KV_PER_TOKEN) for i in range(count))
    return Profile("toy", "float32", blocks, max_context=32_768)


def fits(profile: Profile, budgets: dict, max_tokens: int) -> bool:
    try:
        make_plan(profile, budgets, Workload(1, max_tokens))
    except DoesNotFitError:
        return False
    return True


def test_with_no_workload_the_default_sequence_is_planned_when_it_fits():
    plan = make_plan(layers(), {"cpu": 200 * MiB})
    assert plan.workload.max_tokens == DEFAULT_MAX_TOKENS
    assert not any("no workload given" in reason for reason in plan.reasons)


def test_with_no_workload_a_plan_is_made_for_the_longest_sequence_that_fits():
    profile, budgets = layers(), {"cpu": 4 * MiB + 2000 * 4 * 4 * KV_PER_TOKEN}
    assert not fits(profile, budgets, DEFAULT_MAX_TOKENS)
    plan = make_plan(profile, budgets)
    longest = plan.workload.max_tokens
    assert MIN_DEFAULT_TOKENS <= longest < DEFAULT_MAX_TOKENS
    assert fits(profile, budgets, longest) and not fits(profile, budgets, longest + 1)
    said = f"no workload given: planned for 1 × {longest:,} tokens, the most that fit"
    assert said in plan.reasons[0]
    assert said in str(plan)


def test_a_workload_given_is_refused_rather_than_shortened():
    profile, budgets = layers(), {"cpu": 4 * MiB + 2000 * 4 * 4 * KV_PER_TOKEN}
    with pytest.raises(DoesNotFitError, match=f"1 × {DEFAULT_MAX_TOKENS}-token sequences"):
        make_plan(profile, budgets, Workload(1, DEFAULT_MAX_TOKENS))


def test_with_no_workload_a_budget_below_the_floor_is_refused_for_the_floor():
    profile = layers()
    budget = 4 * MiB + (MIN_DEFAULT_TOKENS - 1) * 4 * 4 * KV_PER_TOKEN
    with pytest.raises(DoesNotFitError, match=f"1 × {MIN_DEFAULT_TOKENS}-token sequences"):
        make_plan(profile, {"cpu": budget})


def test_a_model_with_a_short_context_keeps_its_context_as_the_default():
    profile = Profile("short", "float32", layers().blocks, max_context=128)
    assert make_plan(profile, {"cpu": 200 * MiB}).workload.max_tokens == 128


def test_a_forward_past_the_planned_workload_warns_once_with_the_numbers(random_model_folder):
    model = load(random_model_folder("llama"), device_map="cpu", workload=Workload(1, 8))
    inputs = torch.ones(1, 6, dtype=torch.long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(inputs, max_new_tokens=2, do_sample=False)
        assert caught == []
        model.generate(inputs, max_new_tokens=5, do_sample=False)
        model.generate(inputs, max_new_tokens=5, do_sample=False)
    assert [str(w.message).split(",")[0] for w in caught] == ["this forward runs 1 × 9 tokens"]
    assert "past the 1 × 8 the plan reserved" in str(caught[0].message)


def test_the_readme_example_loads_the_demo_model_on_a_150mb_cpu_budget(demo_model):
    model = devicemap.load(demo_model, device_map="auto", max_memory={"cpu": "150MB"})
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    out = model.generate(**tokenizer("What is machine learning?", return_tensors="pt"), max_new_tokens=3)
    assert out.shape[1] > 3
    assert MIN_DEFAULT_TOKENS <= model.devicemap_plan.workload.max_tokens < DEFAULT_MAX_TOKENS
