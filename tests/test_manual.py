import pytest
from full_size import full_profile

from devicemap.errors import DeviceMapError, DeviceNotFoundError, DoesNotFitError
from devicemap.model.profile import Block, Profile
from devicemap.planning.planner import make_plan
from devicemap.workload import Workload

GiB = 2**30
BUDGETS = {"cuda:0": GiB, "cuda:1": GiB, "cpu": GiB, "disk": GiB}


def layer(index: int) -> Block:
    name = f"model.layers.{index}"
    return Block(name, 100, tensor_names=(f"{name}.attn.weight", f"{name}.mlp.weight"))


def toy() -> Profile:
    blocks = (
        Block("model.embed_tokens", 400, tensor_names=("model.embed_tokens.weight",)),
        *(layer(index) for index in range(4)),
        Block("lm_head", 0, tensor_names=("lm_head.weight",)),
    )
    tied = (("model.embed_tokens", "lm_head"),)
    return Profile("toy", "float32", blocks, tied=tied, head="lm_head", vocab_size=10, max_context=64)


def manual(device_map, budgets=BUDGETS, offload=True):
    return make_plan(toy(), budgets, Workload(1, 8), device_map, offload)


def devices_of(plan) -> dict[str, str]:
    return {p.block: p.device for p in plan.placements}


def test_the_longest_matching_prefix_wins():
    plan = manual({"": 0, "model.layers": 1, "model.layers.3": "cpu", "model.layers.3.mlp": "cpu"})
    assert devices_of(plan) == {
        "model.embed_tokens": "cuda:0", "model.layers.0": "cuda:1", "model.layers.1": "cuda:1",
        "model.layers.2": "cuda:1", "model.layers.3": "cpu", "lm_head": "cuda:0",
    }  # fmt: skip
    assert plan.strategy == "manual"


def test_a_parent_module_may_be_named_even_if_no_block_has_its_name():
    plan = manual({"model": 0, "model.layers.2": 1, "model.layers.3": 1, "lm_head": 0})
    assert devices_of(plan)["model.layers.1"] == "cuda:0"
    assert devices_of(plan)["model.layers.2"] == "cuda:1"


def test_offloaded_blocks_execute_on_the_accelerator_before_them():
    plan = manual({"": 0, "model.layers.1": 1, "model.layers.2": "cpu", "model.layers.3": "disk"})
    executors = {p.block: p.execution_device for p in plan.offloaded()}
    assert executors == {"model.layers.2": "cuda:1", "model.layers.3": "cuda:1"}


def test_a_weight_no_key_covers_is_an_error_naming_it():
    with pytest.raises(DeviceMapError, match=r"covers no device for 2 weight\(s\): model\.layers\.3\.attn\.weight, "
                       r"model\.layers\.3\.mlp\.weight; add entries for them, or a '' entry"):  # fmt: skip
        manual({"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 0, "model.layers.2": 1, "lm_head": 0})


def test_a_key_that_names_no_module_is_an_error_suggesting_the_closest_names():
    with pytest.raises(DeviceMapError, match=r"names no module of toy: 'model.layer.1' \(did you mean "
                       r"'model.layers.1'.*\); 'decoder' *$"):  # fmt: skip
        manual({"": 0, "model.layer.1": 1, "decoder": 1})


def test_a_device_that_does_not_exist_is_an_error_naming_it():
    with pytest.raises(DeviceNotFoundError, match=r"names cuda:5, which have no budget .*known: cuda:0, cuda:1"):
        manual({"": 0, "model.layers.1": 5})


def test_tied_weights_on_two_devices_are_an_error_naming_both():
    with pytest.raises(DeviceMapError, match=r"tied weights must share a device.*model\.embed_tokens on cuda:0 "
                       r"and lm_head on cuda:1"):  # fmt: skip
        manual({"": 0, "lm_head": 1})


def test_a_block_split_across_devices_is_an_error_naming_it():
    with pytest.raises(DeviceMapError, match=r"splits block\(s\) .*: model\.layers\.2 \(cuda:0, cuda:1\)"):
        manual({"": 0, "model.layers.2.mlp": 1})


def test_a_device_over_its_budget_is_a_warning_with_the_numbers():
    budgets = {**BUDGETS, "cuda:1": 150}
    numbers = r"puts 200 B on cuda:1 \(weights 200 B, buffers 0 B, KV cache 0 B, .*\) but its budget is 150 B"
    with pytest.warns(UserWarning, match=numbers):
        plan = manual({"": 0, "model.layers.1": 1, "model.layers.2": 1}, budgets)
    assert devices_of(plan)["model.layers.2"] == "cuda:1"


def test_strict_mode_refuses_a_manual_map_that_offloads():
    with pytest.raises(DoesNotFitError, match=r"offload=False.*1 block\(s\) \(100 B, from model\.layers\.3\)"):
        manual({"": 0, "model.layers.3": "disk"}, offload=False)


@pytest.mark.parametrize("name", ["llama-3-8b", "gpt2", "t5-small"])
def test_a_plans_device_map_given_back_as_a_manual_map_places_every_block_the_same(name):
    budgets = {"cuda:0": 6 * GiB, "cuda:1": 12 * GiB, "cpu": 64 * GiB}
    plan = make_plan(full_profile(name), budgets, Workload(1, 1024), "auto")
    again = make_plan(full_profile(name), budgets, Workload(1, 1024), plan.device_map)
    assert devices_of(again) == devices_of(plan)


def test_a_map_that_leaves_out_a_module_of_computed_buffers_places_it_beside_its_neighbour():
    blocks = (
        Block("model.embed_tokens", 100, tensor_names=("model.embed_tokens.weight",)),
        Block("model.rotary_emb", 0, buffer_bytes=64, tensor_names=("model.rotary_emb.inv_freq",)),
        Block("model.layers.0", 100, tensor_names=("model.layers.0.weight",)),
    )
    profile = Profile("toy", "float32", blocks)
    plan = make_plan(profile, {"cuda:0": 10_000, "cuda:1": 10_000}, Workload(1, 8),
                     {"model.embed_tokens": 1, "model.layers": 0})
    assert {p.block: p.device for p in plan.placements}["model.rotary_emb"] == "cuda:1"
