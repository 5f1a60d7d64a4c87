import math

import pytest
from brute_force import (
    best_split_by_dp,
    compute_devices,
    price_split,
    solve,
    solve_on_accelerators,
    spreads,
    stream_room,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from synthetic import cases

from devicemap.devices import is_accelerator
from devicemap.errors import DeviceMapError, DoesNotFitError
from devicemap.model.profile import Block, Profile
from devicemap.planning.ledger import price_units
from devicemap.planning.planner import STRATEGIES, make_plan
from devicemap.workload import Workload

GiB = 2**30
SETTINGS = settings(max_examples=60, deadline=None)


def plan_or_none(case, strategy, offload=True):
    try:
        return make_plan(case.profile, case.budgets, case.workload, strategy, offload)
    except DoesNotFitError:
        return None


def unit_devices(plan) -> list[str]:
    """The device holding each unit, in execution order."""
    where = {p.block: p.device for p in plan.placements}
    return [where[unit.name] for unit in price_units(plan.profile, plan.workload)]


def resident_groups(plan) -> list[int]:
    """How many units each compute device holds, in device order."""
    devices = unit_devices(plan)
    return [devices.count(device) for device in compute_devices(dict(plan.budgets))]


def layers(count: int, weight_bytes: int = 100, kv_values: int = 8) -> Profile:
    blocks = tuple(
        Block(f"model.layers.{i}", weight_bytes, kv_values_per_token=kv_values, activation_bytes_per_token=4)
        for i in range(count)
    )
    return Profile("layers", "float32", blocks, max_context=1024)


# The unit prices everything else rests on, computed by hand.


def test_units_price_weights_kv_state_activations_and_logits_for_the_workload():
    blocks = (
        Block("embed", 1000, buffer_bytes=10, activation_bytes_per_token=3),
        Block("layer", 500, kv_values_per_token=6, kv_window=4, state_values=5, activation_bytes_per_token=7,
              float32_state_values=3),
        Block("head", 0),
    )
    profile = Profile("toy", "float32", blocks, tied=(("embed", "head"),), head="head", vocab_size=100)
    embed_and_head, layer = price_units(profile, Workload(batch_size=2, max_tokens=16, kv_dtype="bfloat16"))
    assert [b.name for b in embed_and_head.blocks] == ["embed", "head"]
    assert (embed_and_head.weight_bytes, embed_and_head.buffer_bytes) == (1000, 10)
    assert embed_and_head.activation_bytes == 3 * 2 * 16
    assert embed_and_head.logits_bytes == 2 * 100 * 4 * 2  # batch × vocab × float32 × (logits, scores)
    assert layer.kv_bytes_per_token == 6 * 2 * (4 / 16)  # values × bf16 bytes × the window's share
    assert layer.fixed_kv_bytes == (5 * 2 + 3 * 4) * 2  # (state × bf16 bytes + float32 state × 4) × batch
    assert layer.activation_bytes == 7 * 2 * 16


# Against a brute force over every contiguous split.


@SETTINGS
@given(cases(), st.sampled_from(["auto", "balanced"]))
def test_balanced_and_auto_fit_as_many_kv_tokens_as_the_best_contiguous_split(case, strategy):
    best = solve(case.units, case.budgets, case.tokens)
    plan = plan_or_none(case, strategy)
    if best is None:
        # Beyond every split whose offloaded blocks execute on the last device: spreading them.
        assert plan is None or spreads(plan)
        return
    assert not spreads(plan)
    assert sum(resident_groups(plan)) == best.resident
    if math.isinf(best.best_capacity):
        assert math.isinf(plan.kv_token_capacity)
        assert plan_max_share(plan) <= best.best_max_share + 1e-9
    else:
        # An integer search over tokens: the plan is within one token of the real optimum.
        assert best.best_capacity - 1 < plan.kv_token_capacity <= best.best_capacity + 1e-6


def plan_max_share(plan) -> float:
    return max(row.used_bytes / row.budget_bytes for row in plan.ledger if is_accelerator(row.device))


@SETTINGS
@given(cases(), st.sampled_from(STRATEGIES))
def test_every_strategy_finds_a_contiguous_split_whenever_one_fits_and_spreads_offload_only_when_none_does(
    case, strategy
):
    best = solve(case.units, case.budgets, case.tokens)
    plan = plan_or_none(case, strategy)
    if best is not None:
        assert plan is not None and not spreads(plan)
    else:
        assert plan is None or spreads(plan)


@SETTINGS
@given(cases(gpus=st.just(0), disk=st.booleans()), st.sampled_from(STRATEGIES))
def test_without_accelerators_the_cpu_computes_and_disk_holds_the_rest(case, strategy):
    best = solve(case.units, case.budgets, case.tokens)
    plan = plan_or_none(case, strategy)
    assert (plan is None) == (best is None)
    if plan is not None:
        assert {p.execution_device for p in plan.placements} == {"cpu"}
        assert unit_devices(plan).count("cpu") == best.resident


@SETTINGS
@given(cases(), st.sampled_from(STRATEGIES))
def test_no_device_goes_over_its_budget_with_its_reserves(case, strategy):
    plan = plan_or_none(case, strategy)
    if plan is not None:
        for row in plan.ledger:
            assert row.used_bytes <= row.budget_bytes, row


@SETTINGS
@given(cases(), st.sampled_from(STRATEGIES))
def test_each_device_holds_one_contiguous_run_in_execution_order_and_ties_stay_together(case, strategy):
    plan = plan_or_none(case, strategy)
    if plan is None:
        return
    order = [*compute_devices(dict(plan.budgets)), "cpu", "disk"]
    ranks = [order.index(device) for device in unit_devices(plan)]
    assert ranks == sorted(ranks)
    where = {p.block: p.device for p in plan.placements}
    for group in plan.profile.tied:
        assert len({where[name] for name in group}) == 1


@SETTINGS
@given(cases(gpus=st.integers(2, 4)))
def test_balanced_low_0_puts_the_fewest_blocks_on_gpu_0_that_let_the_rest_fit(case):
    on_accelerators = solve_on_accelerators(case.units, case.budgets, case.tokens)
    plan = plan_or_none(case, "balanced_low_0")
    if on_accelerators is not None:
        assert resident_groups(plan)[0] == on_accelerators.fewest_on_first


@SETTINGS
@given(cases(), st.sampled_from(["auto", "balanced_low_0", "balanced", "sequential"]))
def test_nothing_spills_to_cpu_or_disk_while_the_accelerators_have_room(case, strategy):
    plan = plan_or_none(case, strategy)
    if solve_on_accelerators(case.units, case.budgets, case.tokens) is not None:
        assert plan.offloaded() == ()


@SETTINGS
@given(cases())
def test_sequential_fills_each_device_until_the_next_block_would_not_fit(case):
    plan = plan_or_none(case, "sequential")
    if plan is None:
        return
    units, counts = case.units, resident_groups(plan)
    executing = {p.block: p.execution_device for p in plan.offloaded()}
    start = 0
    for device, count in zip(compute_devices(case.budgets)[:-1], counts[:-1]):
        grown = tuple(units[start : start + count + 1])
        start += count
        streamed = tuple(unit for unit in units if executing.get(unit.name) == device)
        if start < sum(counts):
            assert price_split((grown,), streamed, (device,), case.budgets, case.tokens) is None


@SETTINGS
@given(cases(gpus=st.integers(1, 3), cpu=st.just(True), disk=st.booleans()))
def test_offloaded_blocks_execute_on_the_last_accelerator_which_keeps_room_to_stream_them(case):
    plan = plan_or_none(case, "auto")
    if plan is None or not plan.offloaded() or solve(case.units, case.budgets, case.tokens) is None:
        return
    executors = {p.execution_device for p in plan.offloaded()}
    last = compute_devices(case.budgets)[-1]
    assert executors == {last}
    largest = max(b.weight_bytes for b in plan.profile.blocks if b.name in {p.block for p in plan.offloaded()})
    row = next(row for row in plan.ledger if row.device == last)
    assert row.stream_bytes >= 2 * largest
    offloaded = {p.block for p in plan.offloaded()}
    offloaded_units = [u for u in price_units(plan.profile, plan.workload) if u.name in offloaded]
    assert row.stream_bytes == stream_room(offloaded_units)


@SETTINGS
@given(cases(cpu=st.just(True), disk=st.booleans()))
def test_strict_mode_refuses_to_offload_exactly_when_the_accelerators_cannot_hold_everything(case):
    on_accelerators = solve_on_accelerators(case.units, case.budgets, case.tokens)
    plan = plan_or_none(case, "auto", offload=False)
    assert (plan is None) == (on_accelerators is None)


# Fixed cases: messages, devices, sizes.


def test_offloaded_kv_cache_counts_when_the_resident_blocks_cache_nothing():
    blocks = (Block("embed", 10), *(Block(f"layers.{i}", 100, kv_values_per_token=1) for i in range(3)))
    profile = Profile("toy", "int8", blocks, max_context=64)
    plan = make_plan(profile, {"cuda:0": 10, "cuda:1": 250, "cpu": 1000}, Workload(1, 1, "int8"))
    # cuda:1 streams and caches for the offloaded layers; the embedding belongs on cuda:0.
    assert plan.device_map == {"embed": 0, "layers": "cpu"}
    assert plan.kv_token_capacity == pytest.approx(50 / 3)
    assert "nothing is cached per token" not in str(plan)


def test_offloaded_blocks_spread_over_the_gpus_when_no_one_gpu_can_hold_the_kv_cache_of_them_all():
    # 12 layers of 1000 B, each caching 512 B for 16 tokens. Executing offloaded layers on the last
    # GPU alone needs 2000 B to stream them plus 512 B each: more than 4200 B, whatever stays resident.
    profile = layers(12, weight_bytes=1000)
    budgets = {"cuda:0": 4200, "cuda:1": 4200, "cuda:2": 4200, "cpu": 20_000}
    workload = Workload(1, 16)
    assert solve(price_units(profile, workload.resolve(1024, "float32")), budgets, 16) is None
    plan = make_plan(profile, budgets, workload)
    executing = [p.execution_device for p in plan.placements]
    assert {p.device for p in plan.placements} == {"cpu"}
    assert executing == ["cuda:0"] * 4 + ["cuda:1"] * 4 + ["cuda:2"] * 4
    for row in plan.ledger:
        assert row.used_bytes <= row.budget_bytes
        if row.device.startswith("cuda"):
            assert (row.stream_bytes, row.kv_bytes) == (2000, 4 * 512)
    assert "execute on cuda:0 (4), cuda:1 (4), cuda:2 (4), spread so that no one device" in str(plan)


def test_the_spread_follows_the_budgets_and_keeps_the_order_of_the_layers():
    profile = layers(12, weight_bytes=1000)
    budgets = {"cuda:0": 4200, "cuda:1": 7000, "cpu": 20_000}
    plan = make_plan(profile, budgets, Workload(1, 16))
    # cuda:1 has 5/8 of the budget: it computes 8 of the 12, the later ones.
    assert [p.execution_device for p in plan.offloaded()] == ["cuda:0"] * 4 + ["cuda:1"] * 8
    assert all(row.used_bytes <= row.budget_bytes for row in plan.ledger)


def test_gpus_with_no_budget_at_all_are_an_error_not_a_crash():
    budgets = {"cuda:0": 0, "cuda:1": 0, "cpu": 20_000}
    with pytest.raises(DoesNotFitError, match=r"budgets add to .*cuda:0 0 B, cuda:1 0 B"):
        make_plan(layers(4), budgets, Workload(1, 16))


def test_one_device_takes_everything_when_it_fits():
    profile = layers(4)
    for device_map, device in [("cuda:1", "cuda:1"), (1, "cuda:1"), ("cpu", "cpu")]:
        plan = make_plan(profile, {"cuda:0": GiB, "cuda:1": GiB, "cpu": GiB}, Workload(1, 16), device_map)
        assert {p.device for p in plan.placements} == {device}
        assert plan.device_map == {"": device if device == "cpu" else 1}


def test_one_device_that_is_too_small_is_an_error_with_the_numbers():
    numbers = r"on cuda:0 needs 2\.5 KiB \(weights 400 B, buffers 0 B, KV cache 2\.0 KiB, activations 64 B\).*is 1000 B"
    with pytest.raises(DoesNotFitError, match=numbers):
        make_plan(layers(4), {"cuda:0": 1000}, Workload(1, 16), 0)


def test_a_device_map_that_is_neither_strategy_nor_device_is_an_error_listing_both():
    with pytest.raises(DeviceMapError, match=r"'balanced_low_1' is not understood.*balanced_low_0.*'cuda:N'"):
        make_plan(layers(4), {"cuda:0": GiB}, Workload(1, 16), "balanced_low_1")


def test_one_device_without_a_budget_is_an_error_naming_the_known_ones():
    with pytest.raises(DeviceMapError, match=r"'cuda:3' names a device with no budget.*cuda:0, cpu"):
        make_plan(layers(4), {"cuda:0": GiB, "cpu": GiB}, Workload(1, 16), "cuda:3")


def test_an_infeasible_model_is_an_error_with_what_it_needs_and_what_there_is():
    message = (
        r"layers needs 4\.5 KiB .* 1 × 16-token sequences; the budgets add to 2\.0 KiB \(cuda:0 1000 B, "
        r"cuda:1 1000 B\), and no contiguous split fits; add at least 2\.5 KiB more on cuda:0, cuda:1, or "
        r"max_memory for cpu or disk"
    )
    with pytest.raises(DoesNotFitError, match=message):
        make_plan(layers(4, kv_values=16), {"cuda:0": 1000, "cuda:1": 1000}, Workload(1, 16))


def test_an_infeasible_model_with_room_on_cpu_says_the_kv_cache_must_stay_on_the_gpus():
    budgets = {"cuda:0": 1000, "cuda:1": 1000, "cpu": 10**6, "disk": 10**9}
    message = (
        r"budgets add to 954\.6 MiB .*, but the KV cache and activations stay on cuda:0, cuda:1, and the devices "
        r"computing the blocks on cpu or disk also keep theirs"
    )
    with pytest.raises(DoesNotFitError, match=message):
        make_plan(layers(4, kv_values=16), budgets, Workload(1, 16))


def test_strict_mode_names_the_blocks_that_would_be_offloaded():
    budgets = {"cuda:0": 800, "cpu": 10_000}
    assert make_plan(layers(8, kv_values=0), budgets, Workload(1, 16)).offloaded()
    with pytest.raises(DoesNotFitError, match=r"needs 864 B .* budgets add to 800 B \(cuda:0 800 B\).*allow offload"):
        make_plan(layers(8, kv_values=0), budgets, Workload(1, 16), offload=False)


def test_strict_mode_allows_the_cpu_as_the_one_device_chosen_on_a_gpu_machine():
    budgets = {"cuda:0": 800, "cpu": 10_000}
    plan = make_plan(layers(8, kv_values=0), budgets, Workload(1, 16), "cpu", offload=False)
    assert {(p.device, p.execution_device) for p in plan.placements} == {("cpu", "cpu")}


def test_strict_mode_refuses_weights_kept_on_the_cpu_for_a_gpu_to_compute():
    budgets = {"cuda:0": 800, "cpu": 10_000}
    manual_map = {"model.layers.0": "cuda:0", "model.layers": "cpu"}
    kept_away = r"7 block\(s\) \(.*, from model.layers.1\) would be kept on cpu and computed on cuda:0"
    with pytest.raises(DoesNotFitError, match=kept_away):
        make_plan(layers(8, kv_values=0), budgets, Workload(1, 16), manual_map, offload=False)


def test_a_24_and_a_48_gib_gpu_share_the_kv_cache_in_proportion_to_their_room():
    profile = layers(32, weight_bytes=GiB // 2, kv_values=1024)
    plan = make_plan(profile, {"cuda:0": 24 * GiB, "cuda:1": 48 * GiB}, Workload(1, 4096, "float32"))
    cuda0, cuda1 = plan.ledger
    assert cuda0.blocks < cuda1.blocks
    units = price_units(plan.profile, plan.workload)
    best = solve_on_accelerators(units, dict(plan.budgets), 4096)
    assert plan.kv_token_capacity > best.best_capacity - 1


def test_the_same_inputs_give_the_same_plan_byte_for_byte():
    budgets = {"cuda:0": 3000, "cuda:1": 2500, "cuda:2": 4000, "cpu": 10_000, "disk": 10**6}
    plans = [make_plan(layers(40, kv_values=2), dict(budgets), Workload(2, 8), s) for s in STRATEGIES * 2]
    assert [p.to_json() for p in plans[:4]] == [p.to_json() for p in plans[4:]]


def test_a_400_block_model_is_planned_over_8_gpus_with_even_kv_room():
    profile = layers(400, weight_bytes=GiB // 4, kv_values=2048)
    budgets = {f"cuda:{i}": 20 * GiB for i in range(8)}
    plan = make_plan(profile, budgets, Workload(4, 8192, "bfloat16"))
    assert [row.blocks for row in plan.ledger] == [50] * 8
    assert plan.offloaded() == ()
    assert plan.kv_token_capacity == min(row.kv_token_capacity for row in plan.ledger)


@SETTINGS
@given(cases(disk=st.just(False), cpu=st.just(False)))
def test_the_dynamic_program_used_on_big_models_agrees_with_the_brute_force(case):
    best = solve(case.units, case.budgets, case.tokens)
    by_dp = best_split_by_dp(case.units, compute_devices(case.budgets), case.budgets, case.tokens)
    if best is None:
        assert by_dp == -math.inf
    else:
        assert by_dp == best.best_capacity
