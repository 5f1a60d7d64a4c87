"""The GPU facts a pipeline decides on, given as data: GPU counts, LOCAL_RANK, budgets, the launcher's environment."""

import pytest
import torch

from devicemap.devices import CUDA_RUNTIME_RESERVE_BYTES
from devicemap.errors import PipelineError
from devicemap.model.profile import Block, Profile
from devicemap.pipeline.api import Pipeline, check_gpus_for, check_ranks_measurable, plan_stages
from devicemap.pipeline.launch import _worker_environment
from devicemap.pipeline.worker import (
    NCCL_BUFFER_BYTES,
    WorkerSpec,
    budget_beside_rank,
    check_gpu_of_rank,
    describe_reserve,
    rank_cuda_reserve,
)
from devicemap.workload import Workload


@pytest.mark.parametrize("local_rank, local_world_size, gpus", [(0, 1, 1), (3, 4, 4), (1, None, 2), (0, 2, 8)])
def test_a_rank_with_a_gpu_of_its_own_passes(local_rank, local_world_size, gpus):
    check_gpu_of_rank(0, local_rank, local_world_size, gpus)


def test_a_local_rank_beyond_the_visible_gpus_is_refused_naming_the_rank_and_what_to_do():
    with pytest.raises(PipelineError) as error:
        check_gpu_of_rank(5, 2, None, 2)
    message = str(error.value)
    assert "rank 5 (LOCAL_RANK 2, LOCAL_WORLD_SIZE not set)" in message
    assert "sees 2 GPU(s)" in message and "LOCAL_RANK 2 names no GPU" in message
    assert "--nproc-per-node at most 2" in message and "CUDA_VISIBLE_DEVICES" in message and "device='cpu'" in message


def test_more_ranks_on_a_machine_than_gpus_is_refused_even_for_a_rank_whose_gpu_exists(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(PipelineError, match=r"rank 1 \(LOCAL_RANK 1, LOCAL_WORLD_SIZE 4\).*sees 2 GPU\(s\) "
                       r"\(CUDA_VISIBLE_DEVICES='0,1'\).*4 ranks on this machine would share its GPUs"):
        check_gpu_of_rank(1, 1, 4, 2)


def test_a_cuda_rank_on_a_machine_without_gpus_is_refused():
    with pytest.raises(PipelineError, match="sees 0 GPU.*names no GPU"):
        check_gpu_of_rank(0, 0, 1, 0)


def _spec(device: str) -> WorkerSpec:
    return WorkerSpec(model="m", stages=2, dtype=None, workload=Workload(), timeout_s=1.0, device=device)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_launcher_binds_gloo_and_nccl_to_the_loopback_interface(device, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    env = _worker_environment(_spec(device), "127.0.0.1")
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"


def _tiny_profile() -> Profile:
    blocks = tuple(Block(name, 2**20) for name in ("embed", "layers.0", "layers.1", "layers.2", "layers.3", "head"))
    return Profile("tiny", "float32", blocks, head="head")


def test_a_cuda_rank_budget_keeps_the_reserve_for_its_context_cublas_and_nccl_out_of_what_was_measured():
    assert rank_cuda_reserve() == 1280 * 2**20
    assert budget_beside_rank(24 * 2**30) == 24 * 2**30 - 1280 * 2**20
    assert budget_beside_rank(rank_cuda_reserve() // 2) == 0


def test_a_cuda_rank_reserve_is_the_runtime_reserve_of_any_process_plus_nccl_buffers(monkeypatch):
    assert NCCL_BUFFER_BYTES == 384 * 2**20
    assert rank_cuda_reserve() == CUDA_RUNTIME_RESERVE_BYTES + NCCL_BUFFER_BYTES
    monkeypatch.setenv("DEVICEMAP_CUDA_RESERVE", "2GiB")
    assert rank_cuda_reserve() == 2 * 2**30 + NCCL_BUFFER_BYTES


def test_planning_cuda_stages_for_gpus_this_machine_lacks_needs_only_their_budgets():
    plan = plan_stages(_tiny_profile(), 4, max_memory=[2**30] * 4, device="cuda", offload=False)
    assert [stage.rank for stage in plan.stages] == [0, 1, 2, 3]
    assert "every GPU rank's budget was given and is its stage's alone: leave 1.2 GiB" in str(plan)
    assert not torch.cuda.is_initialized()


def test_the_reason_line_names_the_gpu_ranks_whose_measured_memory_keeps_the_reserve():
    line = describe_reserve([1, 3])
    assert line.startswith("GPU rank(s) 1, 3 keep 1.2 GiB for what a rank holds beside its stage")
    assert "cuBLAS workspaces, NCCL buffers" in line


def test_a_rank_with_no_budget_on_a_gpu_this_machine_lacks_is_refused_naming_it():
    with pytest.raises(PipelineError, match=r"rank\(s\) 2, 3 have no budget.*has 2 GPU\(s\).*'2=24GiB'"):
        check_ranks_measurable([0, 2, 3], gpus=2)
    check_ranks_measurable([0, 1], gpus=2)


@pytest.mark.skipif(torch.cuda.device_count() >= 3, reason="this machine has 3 GPUs")
def test_planning_refuses_a_cuda_rank_it_can_neither_measure_nor_was_given_a_budget_for():
    with pytest.raises(PipelineError, match=r"rank\(s\) 2 have no budget in max_memory"):
        plan_stages(_tiny_profile(), 3, max_memory={0: "1GiB", 1: "1GiB"}, device="cuda", offload=False)


def test_starting_cuda_stages_needs_one_gpu_per_stage():
    check_gpus_for(2, 2)
    with pytest.raises(PipelineError, match="4 stages on CUDA need 4 GPUs on this machine, which has 2"):
        check_gpus_for(4, 2)


@pytest.mark.skipif(torch.cuda.device_count() >= 4, reason="this machine has 4 GPUs")
def test_a_pipeline_of_more_cuda_stages_than_gpus_is_refused_before_reading_the_model(tmp_path):
    with pytest.raises(PipelineError, match="4 stages on CUDA need 4 GPUs"):
        Pipeline(tmp_path / "no-model-here", stages=4, device="cuda", max_memory=[2**30] * 4)
