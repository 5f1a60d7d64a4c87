"""The GPU facts a pipeline decides on, given as data: GPU counts, LOCAL_RANK, budgets, the launcher's environment."""

import pytest

from devicemap.pipeline.launch import _worker_environment
from devicemap.pipeline.worker import WorkerSpec
from devicemap.workload import Workload


def _spec(device: str) -> WorkerSpec:
    return WorkerSpec(model="m", stages=2, dtype=None, workload=Workload(), timeout_s=1.0, device=device)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_launcher_binds_gloo_and_nccl_to_the_loopback_interface(device, monkeypatch):
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")
    env = _worker_environment(_spec(device), "127.0.0.1")
    assert env["GLOO_SOCKET_IFNAME"] == env["NCCL_SOCKET_IFNAME"] == "lo"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
