import os

import psutil
import pytest
import torch

from devicemap.devices import (
    _contexts_held,
    available_devices,
    free_gpu_memory,
    loading_budgets,
    normalize_device,
    parse_max_memory,
    planning_budgets,
)
from devicemap.errors import DeviceMapError, DeviceNotFoundError


@pytest.mark.parametrize(
    "device, name",
    [
        (0, "cuda:0"),
        (3, "cuda:3"),
        ("cuda", "cuda:0"),
        ("cuda:2", "cuda:2"),
        ("CUDA:1", "cuda:1"),
        ("1", "cuda:1"),
        (torch.device("cuda", 1), "cuda:1"),
        (torch.device("cpu"), "cpu"),
        ("mps", "mps"),
        ("cpu", "cpu"),
        ("disk", "disk"),
    ],
)
def test_devices_have_one_canonical_name(device, name):
    assert normalize_device(device) == name


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", -1, 1.0, "tpu:0"])
def test_an_unknown_device_is_an_error_naming_it(bad):
    with pytest.raises(DeviceMapError, match=repr(bad).replace(".", r"\.")):
        normalize_device(bad)


def test_max_memory_parses_from_a_dict_or_the_cli_form():
    assert parse_max_memory({0: "24GiB", "cpu": 1000}) == {"cuda:0": 24 * 2**30, "cpu": 1000}
    assert parse_max_memory("0=24GiB, 1=24GiB,cpu=64GiB") == {
        "cuda:0": 24 * 2**30,
        "cuda:1": 24 * 2**30,
        "cpu": 64 * 2**30,
    }


@pytest.mark.parametrize("bad", ["0:24GiB", "cpu=", "=5GB"])
def test_a_malformed_cli_budget_is_an_error_with_the_expected_form(bad):
    with pytest.raises(DeviceMapError, match="DEVICE=SIZE"):
        parse_max_memory(bad)


def test_default_budgets_are_the_memory_free_now():
    budgets = planning_budgets()
    assert list(budgets) == available_devices()
    assert 0 < budgets["cpu"] <= psutil.virtual_memory().total
    assert budgets["disk"] > 0


def test_explicit_budgets_override_and_may_name_hypothetical_devices_for_planning():
    budgets = planning_budgets({7: "80GiB", "cpu": "1GiB"})
    assert budgets["cuda:7"] == 80 * 2**30
    assert budgets["cpu"] == 2**30
    assert list(budgets)[0] == "cuda:7"


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a GPU 7")
def test_loading_refuses_a_device_that_does_not_exist_naming_it():
    with pytest.raises(DeviceNotFoundError, match="cuda:7.*do not exist on this machine"):
        loading_budgets({7: "80GiB"})


def test_disk_budget_is_the_free_space_where_the_offload_folder_will_be(tmp_path):
    folder = tmp_path / "not" / "yet" / "made"
    assert planning_budgets(offload_folder=folder)["disk"] == os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize


def test_measuring_no_gpu_starts_no_child_and_touches_no_cuda():
    assert free_gpu_memory([]) == {}
    assert not torch.cuda.is_initialized()


@pytest.mark.skipif(torch.cuda.is_initialized(), reason="CUDA was initialized in this process")
def test_a_process_that_has_not_initialized_cuda_holds_no_context_and_is_not_asked():
    assert _contexts_held([0, 1, 7]) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine can measure its GPUs")
def test_a_gpu_this_process_has_no_context_on_is_measured_in_a_child_that_says_why_it_failed():
    # Without CUDA the child's measurement fails: the error names the GPU and what to do,
    # and this process still has not initialized CUDA.
    with pytest.raises(DeviceMapError, match=r"cuda:0, cuda:1 in a child process failed \(.+\).*max_memory"):
        free_gpu_memory([0, 1])
    assert not torch.cuda.is_initialized()


def test_planning_budgets_measure_no_device_whose_budget_is_given():
    budgets = planning_budgets({"cpu": "1GiB", "disk": "2GiB"})
    assert budgets["cpu"] == 2**30 and budgets["disk"] == 2 * 2**30
    assert not torch.cuda.is_initialized()
