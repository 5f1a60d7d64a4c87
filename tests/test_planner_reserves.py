"""Reserves the runtime really allocates: streaming room only where offloaded weights are brought in, and
on every GPU that computes, the runtime reserve a process holds there beside its tensors."""

import pytest

import devicemap
from devicemap.devices import CUDA_RESERVE_ENV, CUDA_RUNTIME_RESERVE_BYTES, runtime_reserves
from devicemap.errors import DeviceMapError, DoesNotFitError
from devicemap.model.profile import Block, Profile
from devicemap.planning.plan import Plan
from devicemap.planning.planner import make_plan
from devicemap.units import format_size
from devicemap.workload import Workload

MiB = 2**20
RESERVE = CUDA_RUNTIME_RESERVE_BYTES
HOST = {"cpu": 10**12, "disk": 10**12}


def layers(count: int = 4, weight_bytes: int = MiB) -> Profile:
    blocks = tuple(Block(f"layers.{i}", weight_bytes, kv_values_per_token=1000) for i in range(count))
    return Profile("toy", "float32", blocks, max_context=32_768)


def test_disk_blocks_computed_on_the_cpu_reserve_no_room_to_stream():
    tied = Profile(
        "tied", "float32",
        (Block("embed", 64 * MiB), *layers(2).blocks, Block("head", 0)),
        tied=(("embed", "head"),), head="head", max_context=512,
    )  # fmt: skip
    plan = make_plan(tied, {"cpu": 16 * MiB, "disk": 10**12}, Workload(1, 512))
    cpu = next(row for row in plan.ledger if row.device == "cpu")
    assert {p.device for p in plan.offloaded()} == {"disk"}
    assert {p.execution_device for p in plan.offloaded()} == {"cpu"}
    assert cpu.stream_bytes == 0
    assert cpu.used_bytes <= 16 * MiB


def test_disk_blocks_streamed_to_a_gpu_take_slots_there_and_pinned_staging_on_the_cpu():
    budgets = {"cuda:0": 100 * MiB, "cpu": 100 * MiB, "disk": 10**12}
    plan = make_plan(layers(), budgets, Workload(1, 64), {"": 0, "layers.3": "disk"})
    streams = {row.device: row.stream_bytes for row in plan.ledger}
    assert streams == {"cuda:0": 2 * MiB, "cpu": 2 * MiB, "disk": 0}


def test_a_refusal_names_the_room_to_stream_when_that_is_what_blocks():
    profile = Profile("big", "float32", (*layers(2).blocks, Block("head", 64 * MiB)), max_context=512)
    with pytest.raises(DoesNotFitError, match=r"room to stream it \(up to 128\.0 MiB for the largest block"):
        make_plan(profile, {"cuda:0": 60 * MiB, "cpu": 200 * MiB, "disk": 10**12}, Workload(1, 64))


def row_of(plan: Plan, device: str):
    return next(row for row in plan.ledger if row.device == device)


def needs_on_one_device(profile: Profile, workload: Workload) -> int:
    """What the model's tensors take on one device, with no runtime reserve."""
    return row_of(make_plan(profile, {"cuda:0": 10**12}, workload, "cuda:0"), "cuda:0").used_bytes


def test_the_default_runtime_reserve_is_the_context_kernels_cublas_workspaces_and_allocator_rounding():
    assert RESERVE == 512 * MiB + 4 * 32 * MiB + 256 * MiB


def test_every_gpu_keeps_the_runtime_reserve_and_no_other_device_does():
    assert runtime_reserves(["cuda:0", "cuda:3", "mps", "cpu", "disk"]) == {"cuda:0": RESERVE, "cuda:3": RESERVE}


def test_the_plan_table_shows_each_gpus_runtime_reserve_in_its_own_column():
    plan = devicemap.plan(layers(), "auto", max_memory={"cuda:0": 2**30, **HOST}, workload=Workload(1, 64))
    header = next(line for line in str(plan).splitlines() if "device" in line)
    assert header.index("streaming") < header.index("runtime") < header.index("budget")
    assert row_of(plan, "cuda:0").runtime_bytes == RESERVE
    assert "896.0 MiB" in next(line for line in str(plan).splitlines() if "cuda:0" in line)
    assert row_of(plan, "cpu").runtime_bytes == row_of(plan, "disk").runtime_bytes == 0


def test_a_budget_given_in_max_memory_holds_the_runtime_reserve_too():
    workload = Workload(1, 64)
    needed = needs_on_one_device(layers(), workload)
    plan = devicemap.plan(layers(), "auto", max_memory={"cuda:0": needed + RESERVE, **HOST}, workload=workload)
    gpu = row_of(plan, "cuda:0")
    assert gpu.blocks == 4 and not plan.offloaded()
    assert gpu.used_bytes == needed and gpu.runtime_bytes == RESERVE and gpu.free_bytes == 0


def test_a_gpu_that_the_tensors_alone_exactly_filled_now_leaves_the_runtime_reserve_free():
    profile, workload = layers(32, 64 * MiB), Workload(1, 64)
    needed = needs_on_one_device(profile, workload)
    budgets = {"cuda:0": needed, **HOST}
    assert not make_plan(profile, budgets, workload, "sequential").offloaded(), "the tensors alone fill it"
    plan = devicemap.plan(profile, "sequential", max_memory=budgets, workload=workload)
    gpu = row_of(plan, "cuda:0")
    assert plan.offloaded(), "what filled the reserve now stays on the CPU"
    assert gpu.runtime_bytes == RESERVE and gpu.free_bytes >= 0 and gpu.used_bytes <= needed - RESERVE


def test_a_gpu_whose_budget_is_below_the_runtime_reserve_is_left_idle_and_keeps_none():
    budgets = {"cuda:0": RESERVE // 2, "cuda:1": 2**30, **HOST}
    plan = devicemap.plan(layers(), "sequential", max_memory=budgets, workload=Workload(1, 64))
    assert row_of(plan, "cuda:0").blocks == 0 and row_of(plan, "cuda:0").runtime_bytes == 0
    assert row_of(plan, "cuda:0").free_bytes == RESERVE // 2
    assert row_of(plan, "cuda:1").blocks == 4 and row_of(plan, "cuda:1").runtime_bytes == RESERVE


def test_everything_on_one_gpu_is_refused_naming_the_runtime_reserve_when_it_is_what_blocks():
    workload = Workload(1, 64)
    needed = needs_on_one_device(layers(), workload)
    with pytest.raises(DoesNotFitError, match=r"on cuda:0 needs .*, runtime reserve 896\.0 MiB\) but its budget"):
        devicemap.plan(layers(), 0, max_memory={"cuda:0": needed, **HOST}, workload=workload)


def test_a_refusal_names_the_runtime_reserve_and_counts_it_in_the_shortfall():
    workload = Workload(1, 64)
    needed = needs_on_one_device(layers(), workload)
    budgets = {"cuda:0": RESERVE + 2 * MiB, "cuda:1": RESERVE + 2 * MiB}
    assert make_plan(layers(), budgets, workload, "auto", offload=False), "the tensors alone fit"
    reserve = r"less the runtime reserve a device keeps when it computes \(cuda:0 896\.0 MiB, cuda:1 896\.0 MiB"
    with pytest.raises(DoesNotFitError, match=reserve + r".*DEVICEMAP_CUDA_RESERVE sets it") as refused:
        make_plan(layers(), budgets, workload, "auto", offload=False, runtime_reserves=runtime_reserves(budgets))
    assert f"add at least {format_size(needed - 4 * MiB)} more on cuda:0, cuda:1" in str(refused.value)


def test_a_manual_map_past_a_gpus_budget_warns_naming_its_runtime_reserve():
    with pytest.warns(UserWarning, match=r"streaming 0 B, runtime reserve 896\.0 MiB\) but its budget is 576\.0 MiB"):
        devicemap.plan(layers(), {"": 0}, max_memory={"cuda:0": 2**30 - RESERVE // 2, **HOST}, workload=Workload(1, 64))


def test_a_plans_runtime_reserves_survive_its_json_round_trip():
    plan = devicemap.plan(layers(), "auto", max_memory={"cuda:0": 2**30, **HOST}, workload=Workload(1, 64))
    assert plan.runtime_reserves == (("cuda:0", RESERVE),)
    assert Plan.from_json(plan.to_json()) == plan


def test_the_environment_sets_the_runtime_reserve_and_a_bad_value_is_refused_naming_it(monkeypatch):
    monkeypatch.setenv(CUDA_RESERVE_ENV, "2GiB")
    assert runtime_reserves(["cuda:0", "cpu"]) == {"cuda:0": 2 * 2**30}
    monkeypatch.setenv(CUDA_RESERVE_ENV, "0")
    plan = devicemap.plan(layers(), "auto", max_memory={"cuda:0": 2**30, **HOST}, workload=Workload(1, 64))
    assert row_of(plan, "cuda:0").runtime_bytes == 0
    monkeypatch.setenv(CUDA_RESERVE_ENV, "lots")
    with pytest.raises(DeviceMapError, match=r"DEVICEMAP_CUDA_RESERVE='lots' is not a size.*default 896\.0 MiB"):
        runtime_reserves(["cuda:0"])
