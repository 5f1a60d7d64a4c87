"""Reserves the runtime really allocates: streaming room only where offloaded weights are brought in."""

import pytest

from devicemap.errors import DoesNotFitError
from devicemap.model.profile import Block, Profile
from devicemap.planning.planner import make_plan
from devicemap.workload import Workload

MiB = 2**20


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
