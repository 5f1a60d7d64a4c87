"""Every strategy's promises on real architectures, built on the meta device from their configs.

The optimum each plan is compared with comes from ``brute_force.best_split_by_dp``, a
dynamic program over every contiguous split, independent of the planner's search.
"""

import math

import pytest
from brute_force import (
    best_split_by_dp,
    compute_devices,
    offload_tiers,
    price_split,
    share_score,
    spreads,
    tiers_can_store,
)
from full_size import FULL_SIZE, full_profile

from devicemap.devices import device_order, is_accelerator
from devicemap.errors import DoesNotFitError
from devicemap.planning.ledger import price_units
from devicemap.planning.planner import STRATEGIES, make_plan
from devicemap.workload import Workload

GiB = 2**30


def gpus(*sizes_gib: int) -> dict[str, int]:
    return {f"cuda:{index}": size * GiB for index, size in enumerate(sizes_gib)}


MACHINES = {
    "1x80": gpus(80),
    "2x24": gpus(24, 24),
    "4x24": gpus(24, 24, 24, 24),
    "3x16": gpus(16, 16, 16),
    "24+48": gpus(24, 48),
    "2x80": gpus(80, 80),
    "8x80": gpus(*[80] * 8),
    "80+40+24+24": gpus(80, 40, 24, 24),
    "4x24+cpu": {**gpus(24, 24, 24, 24), "cpu": 128 * GiB},
    "2x80+cpu+disk": {**gpus(80, 80), "cpu": 256 * GiB, "disk": 4096 * GiB},
    "8x80+cpu+disk": {**gpus(*[80] * 8), "cpu": 512 * GiB, "disk": 4096 * GiB},
    "cpu+disk": {"cpu": 64 * GiB, "disk": 4096 * GiB},
}
WORKLOADS = (Workload(1, 4096), Workload(8, 8192))


def plans_for(name: str, machine: str, workload: Workload):
    profile = full_profile(name)
    plans = {}
    for strategy in STRATEGIES:
        try:
            plans[strategy] = make_plan(profile, MACHINES[machine], workload, strategy)
        except DoesNotFitError as error:
            plans[strategy] = error
    return plans


def resident_counts(plan) -> list[int]:
    where = {p.block: p.device for p in plan.placements}
    devices = [where[unit.name] for unit in price_units(plan.profile, plan.workload)]
    return [devices.count(device) for device in compute_devices(dict(plan.budgets))]


@pytest.mark.parametrize("workload", WORKLOADS, ids=["1x4096", "8x8192"])
@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("name", FULL_SIZE)
def test_every_strategy_keeps_its_promises_on_real_architectures(name, machine, workload):
    plans = plans_for(name, machine, workload)
    budgets = MACHINES[machine]
    auto = plans["auto"]
    profile = full_profile(name)
    resolved = workload.resolve(profile.max_context, profile.dtype)
    units = price_units(profile, resolved)
    tokens = resolved.batch_size * resolved.max_tokens
    compute = compute_devices(budgets)
    fits_on_compute = best_split_by_dp(units, compute, budgets, tokens) > -math.inf
    for strategy, plan in plans.items():
        if isinstance(plan, DoesNotFitError):
            assert not fits_on_compute and isinstance(auto, DoesNotFitError), strategy
            assert "needs" in str(plan) and "budgets add to" in str(plan)
            continue
        assert_within_budgets(plan)
        assert_contiguous_with_ties_together(plan)
        assert_offload_streams_to_where_it_executes(plan)
        if fits_on_compute:
            assert plan.offloaded() == (), strategy
        if spreads(plan):
            assert not any_split_offloads_to_the_last_device(units, compute, budgets, tokens), strategy
    if isinstance(auto, DoesNotFitError):
        return
    for strategy in ("auto", "balanced"):
        if not spreads(plans[strategy]):
            assert_best_kv_capacity(plans[strategy], units, compute, budgets, tokens)
    if fits_on_compute and len(compute) > 1:
        assert_gpu_0_minimal(plans["balanced_low_0"], units, compute, budgets, tokens)
    assert_sequential_fills_in_order(plans["sequential"], units, compute, budgets, tokens)


def assert_within_budgets(plan):
    for row in plan.ledger:
        assert row.used_bytes <= row.budget_bytes, (plan.strategy, row)


def assert_contiguous_with_ties_together(plan):
    where = {p.block: p.device for p in plan.placements}
    ranks = [device_order(where[unit.name]) for unit in price_units(plan.profile, plan.workload)]
    assert ranks == sorted(ranks), plan.strategy
    for group in plan.profile.tied:
        assert len({where[name] for name in group}) == 1, group


def any_split_offloads_to_the_last_device(units, compute, budgets, tokens) -> bool:
    """Whether some contiguous split fits with the offloaded suffix stored on the tiers and executing on the last device."""
    tiers = offload_tiers(budgets, offload=True)
    return any(
        (resident == len(units) or tiers_can_store(tuple(units[resident:]), tiers, budgets))
        and best_split_by_dp(units[:resident], compute, budgets, tokens, tuple(units[resident:])) > -math.inf
        for resident in range(len(units) + 1)
    )


def assert_offload_streams_to_where_it_executes(plan):
    """Offloaded blocks execute on the last compute device, or spread, and each accelerator has room to stream its own.

    The CPU computes disk blocks in place on the mapped file: it keeps no room to stream them.
    """
    offloaded = plan.offloaded()
    if not offloaded:
        return
    if not spreads(plan):
        assert {p.execution_device for p in offloaded} == {compute_devices(dict(plan.budgets))[-1]}
    weights = {block.name: block.weight_bytes for block in plan.profile.blocks}
    for device in {p.execution_device for p in offloaded}:
        largest = max(weights[p.block] for p in offloaded if p.execution_device == device)
        streams = next(row for row in plan.ledger if row.device == device).stream_bytes
        assert streams == 0 if device == "cpu" else streams >= 2 * largest


def assert_best_kv_capacity(plan, units, compute, budgets, tokens):
    resident = sum(resident_counts(plan))
    offloaded = tuple(units[resident:])
    best = best_split_by_dp(units[:resident], compute, budgets, tokens, offloaded)
    if math.isinf(best):
        worst_share = best_split_by_dp(units[:resident], compute, budgets, tokens, offloaded, share_score)
        shares = [row.used_bytes / row.budget_bytes for row in plan.ledger if row.device in compute]
        assert max(shares) <= -worst_share + 1e-9
    else:
        assert best - 1 < plan.kv_token_capacity <= best * (1 + 1e-12), plan.strategy


def assert_gpu_0_minimal(plan, units, compute, budgets, tokens):
    on_first = resident_counts(plan)[0]
    if on_first > 0:
        rest = units[on_first - 1 :]
        assert best_split_by_dp(rest, compute[1:], budgets, tokens) == -math.inf


def assert_sequential_fills_in_order(plan, units, compute, budgets, tokens):
    counts, start = resident_counts(plan), 0
    executing = {p.block: p.execution_device for p in plan.offloaded()}
    for device, count in zip(compute[:-1], counts[:-1]):
        grown = tuple(units[start : start + count + 1])
        start += count
        # A device also computes the offloaded blocks spread to it, if any.
        streamed = tuple(unit for unit in units if executing.get(unit.name) == device)
        if start < sum(counts):
            assert price_split((grown,), streamed, (device,), budgets, tokens) is None


def test_a_model_that_fits_on_the_gpus_alone_is_not_offloaded_even_with_cpu_and_disk():
    plan = make_plan(full_profile("mixtral-8x7b"), MACHINES["2x80+cpu+disk"], Workload(1, 4096))
    assert plan.offloaded() == ()
    assert all(is_accelerator(p.device) for p in plan.placements)


def test_mixtral_8x7b_fits_on_4x24_gib_without_spilling_to_the_cpu_beside_them():
    plan = make_plan(full_profile("mixtral-8x7b"), MACHINES["4x24+cpu"], Workload(1, 4096))
    assert plan.offloaded() == ()
    assert plan.sequences_that_fit > 1


def test_llama_3_1_405b_on_8x80_gib_offloads_only_its_last_layers_and_streams_them_to_the_last_gpu():
    plan = make_plan(full_profile("llama-3.1-405b"), MACHINES["8x80+cpu+disk"], Workload(1, 4096))
    offloaded = [p.block for p in plan.offloaded()]
    assert offloaded[-1] == "lm_head" and "model.layers.125" in offloaded and len(offloaded) < 40
    assert {p.execution_device for p in plan.offloaded()} == {"cuda:7"}
    assert any(f"the last {len(offloaded)}" in reason and "execute on cuda:7" in reason for reason in plan.reasons)
