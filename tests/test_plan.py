import json

import pytest
import torch
from full_size import full_profile
from hypothesis import given, settings
from hypothesis import strategies as st

from devicemap.model.profile import Block, Profile, profile_config
from devicemap.planning.plan import Placement, Plan
from devicemap.planning.planner import STRATEGIES, make_plan
from devicemap.workload import Workload

GiB = 2**30
DEVICES = ("cuda:0", "cuda:1", "cpu", "disk")


@st.composite
def placed_trees(draw) -> Plan:
    """A model of nested modules with several tensors per block, each block on a random device."""
    blocks, placements = [], []
    for top in range(draw(st.integers(1, 3))):
        for layer in range(draw(st.integers(1, 4))):
            name = f"m{top}.layers.{layer}"
            parts = draw(st.lists(st.sampled_from(["attn.q", "attn.k", "mlp.up", "norm"]), min_size=1, unique=True))
            blocks.append(Block(name, 10, tensor_names=tuple(f"{name}.{part}.weight" for part in parts)))
            device = draw(st.sampled_from(DEVICES))
            placements.append(Placement(name, device, device))
    profile = Profile("tree", "float32", tuple(blocks))
    return Plan(profile, Workload(1, 8, "float32"), (("cuda:0", GiB),), "manual", tuple(placements))


def longest_prefix_device(name: str, device_map: dict):
    prefix = name
    while prefix and prefix not in device_map:
        prefix = prefix.rpartition(".")[0]
    return device_map[prefix]


@settings(max_examples=80, deadline=None)
@given(placed_trees())
def test_device_map_holds_the_shortest_prefixes_that_cover_every_tensor(plan):
    device_map = plan.device_map
    device_of = {p.block: p.device for p in plan.placements}
    leaves = {name: device_of[block.name] for block in plan.profile.blocks for name in block.tensor_names}
    for name, device in leaves.items():
        assert str(longest_prefix_device(name, device_map)) == device.removeprefix("cuda:")
    for key in device_map:
        assert not any(other != key and (key == "" or other.startswith(key + ".")) for other in device_map)
        if key:
            parent = key.rpartition(".")[0]
            below = {device for name, device in leaves.items() if parent == "" or name.startswith(parent + ".")}
            assert len(below) > 1, f"{key} could be shortened to {parent!r}"


def test_device_map_names_gpus_by_index_as_transformers_does():
    profile = Profile("toy", "float32", tuple(Block(f"model.layers.{i}", 100) for i in range(4)), max_context=64)
    plan = make_plan(profile, {"cuda:0": 250, "cuda:1": 250}, Workload(1, 8), "sequential")
    assert plan.device_map == {"model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1, "model.layers.3": 1}
    everything = make_plan(profile, {"cuda:0": 1000, "cuda:1": 1000}, Workload(1, 8), "cuda:1")
    assert everything.device_map == {"": 1}


def test_transformers_loads_a_model_with_the_plans_cpu_and_disk_map(random_model_folder, tmp_path):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    folder = random_model_folder("llama")
    profile = profile_config(folder, "float32")
    weights = sum(block.weight_bytes for block in profile.blocks)
    plan = make_plan(profile, {"cpu": weights // 2, "disk": 10 * weights}, Workload(1, 32), "auto")
    assert {p.device for p in plan.placements} == {"cpu", "disk"}
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=plan.device_map, offload_folder=tmp_path)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, model.config.vocab_size)


def test_printing_a_plan_shows_each_devices_ledger_and_how_many_sequences_fit():
    plan = make_plan(
        full_profile("llama-3-8b"), {"cuda:0": 24 * GiB, "cuda:1": 24 * GiB}, Workload(4, 8192), "auto"
    )
    text = str(plan)
    for column in ("device", "weights", "buffers", "KV cache", "activations", "budget", "free"):
        assert column in text
    assert "cuda:0" in text and "cuda:1" in text and "24.0 GiB" in text
    assert f"fits {plan.sequences_that_fit:.1f} × 8192-token sequences" in text
    assert "workload: batch 4 × 8192 tokens, KV cache in bfloat16" in text
    assert plan.reasons and all(f"- {reason}" in text for reason in plan.reasons)
    assert plan.sequences_that_fit == plan.kv_token_capacity / 8192 > 4


def test_the_ledger_is_derived_from_the_placements_and_adds_up():
    profile = full_profile("mixtral-8x7b")
    plan = make_plan(profile, {"cuda:0": 48 * GiB, "cuda:1": 24 * GiB, "cpu": 64 * GiB}, Workload(1, 4096))
    assert sum(row.weight_bytes for row in plan.ledger) == sum(block.weight_bytes for block in profile.blocks)
    assert sum(row.blocks for row in plan.ledger) == len(profile.blocks)
    for row in plan.ledger:
        assert row.free_bytes == row.budget_bytes - row.used_bytes


def test_disk_blocks_computed_on_two_gpus_stage_through_cpu_buffers_of_each():
    blocks = tuple(Block(f"layers.{i}", 100) for i in range(4))
    profile = Profile("toy", "float32", blocks)
    budgets = {"cuda:0": 10_000, "cuda:1": 10_000, "cpu": 10_000, "disk": 10_000}
    on_one = ("cuda:0",) * 4
    on_two = ("cuda:0", "cuda:0", "cuda:1", "cuda:1")
    staged = {}
    for name, executing in (("one", on_one), ("two", on_two)):
        placements = tuple(Placement(f"layers.{i}", "disk", device) for i, device in enumerate(executing))
        plan = Plan(profile, Workload(1, 16).resolve(1024, "float32"), tuple(budgets.items()), "manual", placements)
        staged[name] = {row.device: row.stream_bytes for row in plan.ledger}
    # Room for one block computing and one arriving, per GPU, and again in pinned CPU memory for each GPU.
    assert staged["one"] == {"cuda:0": 200, "cuda:1": 0, "cpu": 200, "disk": 0}
    assert staged["two"] == {"cuda:0": 200, "cuda:1": 200, "cpu": 400, "disk": 0}


@pytest.mark.parametrize("name", ["t5-small", "gpt2", "qwen3-30b-a3b"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_plan_survives_a_json_round_trip(name, strategy):
    budgets = {"cuda:0": 2 * GiB, "cuda:1": 3 * GiB, "cpu": 64 * GiB, "disk": 512 * GiB}
    plan = make_plan(full_profile(name), budgets, Workload(2, 1024), strategy)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.device_map == plan.device_map and again.ledger == plan.ledger
    assert again.to_json() == text
    assert json.loads(text)["strategy"] == strategy
