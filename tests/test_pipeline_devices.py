"""The GPU facts a pipeline decides on, given as data: GPU counts, LOCAL_RANK, budgets, the launcher's environment."""

import pytest

from devicemap.errors import PipelineError
from devicemap.pipeline.launch import _worker_environment
from devicemap.pipeline.worker import WorkerSpec, check_gpu_of_rank
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
