"""Device names, the devices this machine has, and how much memory each has free.

Devices are named by strings: ``"cuda:N"``, ``"mps"``, ``"cpu"`` and ``"disk"``.
Accelerators come first in every ordering, by index, then CPU, then disk.
"""

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import psutil
import torch

from .errors import DeviceMapError, DeviceNotFoundError
from .units import format_size, parse_size, split_assignments

DeviceLike = int | str | torch.device

# What a process computing on a CUDA device holds there beside its tensors, whoever set its
# budget: a plan keeps it free on every GPU it computes on. Free memory is measured beside one
# bare CUDA context (``free_gpu_memory``), which stands for this process's own; beyond it:
# - the kernels the context loads as they first run (lazy module loading, torch's default):
#   torch's and cuBLAS's, a few hundred MiB on recent GPUs, like the bare context: 512 MiB;
# - cuBLAS workspaces: 32 MiB per handle and stream on Hopper (torch's CUBLAS_WORKSPACE_CONFIG
#   default ":4096:8", and CUBLASLT_WORKSPACE_SIZE 32768 KiB), for cuBLAS and cuBLASLt on the
#   compute stream and the offload copy stream: 4 x 32 MiB = 128 MiB;
# - the caching allocator's rounding and fragmentation (torch's "CUDA semantics: memory
#   management"): it rounds requests to 512 B, packs those under 1 MiB into 2 MiB segments,
#   serves those under 10 MiB from 20 MiB segments and rounds larger segments to 2 MiB; a block
#   split off a segment leaves a tail only smaller requests can use, and free blocks in different
#   segments never merge. Prefill and decode allocate activations of different sizes, so such
#   tails add up: about a dozen 20 MiB segments' worth, 256 MiB.
# Apple's "mps" keeps none: its budget is Metal's recommended working set less what the driver
# has allocated, with no CUDA context, cuBLAS or caching allocator in it.
CUDA_RUNTIME_RESERVE_BYTES = 512 * 2**20 + 4 * 32 * 2**20 + 256 * 2**20  # 896 MiB
CUDA_RESERVE_ENV = "DEVICEMAP_CUDA_RESERVE"  # sets it, e.g. after changing CUBLAS_WORKSPACE_CONFIG


def normalize_device(device: DeviceLike) -> str:
    """Return the canonical name of a device: an int N, "cuda", "cuda:N", torch.device, "mps", "cpu", "disk".

    >>> normalize_device(1)
    'cuda:1'
    """
    if isinstance(device, bool):
        raise DeviceMapError(f"device {device!r} is not a device; use an int GPU index or a name")
    if isinstance(device, int):
        if device < 0:
            raise DeviceMapError(f"device {device} is negative; GPU indices start at 0")
        return f"cuda:{device}"
    if isinstance(device, torch.device):
        device = str(device)
    name = device.strip().lower() if isinstance(device, str) else ""  # anything else is refused below
    if name.isdigit():
        return f"cuda:{int(name)}"
    if name in ("cuda", "cuda:0"):
        return "cuda:0"
    if name.startswith("cuda:") and name[5:].isdigit():
        return f"cuda:{int(name[5:])}"
    if name in ("mps", "mps:0"):
        return "mps"
    if name in ("cpu", "disk", "meta"):
        return name
    raise DeviceMapError(f"device {device!r} is not understood; use an int, 'cuda:N', 'mps', 'cpu' or 'disk'")


def is_accelerator(device: str) -> bool:
    """True for GPUs ("cuda:N") and Apple's "mps"."""
    return device.startswith("cuda:") or device == "mps"


def device_order(device: str) -> tuple[int, int]:
    """Sort key: accelerators by index, then CPU, then disk."""
    if device.startswith("cuda:"):
        return (0, int(device[5:]))
    return {"mps": (1, 0), "cpu": (2, 0), "disk": (3, 0)}.get(device, (4, 0))


def available_devices() -> list[str]:
    """The devices this process can use, as CUDA_VISIBLE_DEVICES leaves them, in device order."""
    found = [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if not found and torch.backends.mps.is_available():
        found.append("mps")
    return found + ["cpu", "disk"]


def free_memory(device: str, offload_folder: str | os.PathLike | None = None) -> int:
    """Bytes free on a device now: GPU free memory, available RAM, or free space for disk offload.

    A GPU is measured as :func:`free_gpu_memory` does, without leaving a CUDA context on it.

    >>> free_memory("cpu") > 0
    True
    """
    if device.startswith("cuda:"):
        index = int(device[5:])
        return free_gpu_memory([index])[index]
    if device == "mps":
        return torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()
    if device == "cpu":
        return psutil.virtual_memory().available
    if device == "disk":
        return shutil.disk_usage(_existing_parent(offload_folder or Path.cwd())).free
    raise DeviceMapError(f"device {device!r} has no memory to measure")


def free_gpu_memory(indices: Sequence[int]) -> dict[int, int]:
    """Bytes free on each GPU in ``indices`` beside one CUDA context, creating none in this process.

    A context costs a few hundred MiB of the GPU and lasts as long as the process, so a plan
    must not leave one on every visible GPU. A GPU this process holds a context on already is
    asked directly (``cudaMemGetInfo``, which counts that context as used); the others are
    measured together in one short-lived child process, which sees the same
    ``CUDA_VISIBLE_DEVICES`` and so the same indices, and whose context goes when it exits.
    Either way the figure is what a process holding one context there may still allocate.
    A child, not NVML: NVML numbers GPUs its own way, ignoring ``CUDA_VISIBLE_DEVICES`` and
    ``CUDA_DEVICE_ORDER``, and would be one more dependency; the child costs a second or two.

    >>> free_gpu_memory([])
    {}
    """
    held = _contexts_held(indices)
    free = {index: torch.cuda.mem_get_info(index)[0] for index in held}
    free |= _measure_in_child([index for index in indices if index not in held])
    return {index: free[index] for index in indices}


def _contexts_held(indices: Sequence[int]) -> list[int]:
    """The GPUs among ``indices`` this process has a CUDA context on, found without creating one."""
    if not indices or not torch.cuda.is_initialized():
        return []  # torch has not touched CUDA here, so this process holds no context
    return [index for index in indices if torch._C._cuda_hasPrimaryContext(index)]


# The child reads only its arguments and prints one JSON list: no pickling, nothing of ours imported.
_MEASURE_SCRIPT = (
    "import json, sys, torch; print(json.dumps([torch.cuda.mem_get_info(int(i))[0] for i in sys.argv[1:]]))"
)
_MEASURE_TIMEOUT_S = 120  # importing torch and creating a context per GPU take seconds, not minutes


def _measure_in_child(indices: Sequence[int]) -> dict[int, int]:
    if not indices:
        return {}
    command = [sys.executable, "-c", _MEASURE_SCRIPT, *map(str, indices)]
    names = ", ".join(f"cuda:{index}" for index in indices)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_MEASURE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DeviceMapError(
            f"measuring the free memory of {names} in a child process took over {_MEASURE_TIMEOUT_S} s; check "
            "that CUDA works here (nvidia-smi), or give these devices' budgets in max_memory"
        ) from None
    if done.returncode != 0:
        last_line = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise DeviceMapError(
            f"measuring the free memory of {names} in a child process failed ({last_line}); check that "
            "CUDA works here (nvidia-smi, CUDA_VISIBLE_DEVICES), or give these devices' budgets in max_memory"
        )
    return dict(zip(indices, json.loads(done.stdout.splitlines()[-1])))


def _existing_parent(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser().absolute()
    while not path.exists():
        path = path.parent
    return path


def parse_max_memory(max_memory: dict[DeviceLike, int | str] | str | None) -> dict[str, int]:
    """Parse budgets given as a dict or as the CLI's "0=24GiB,cpu=64GiB" into bytes per device.

    >>> parse_max_memory("0=1GiB,cpu=500MB")
    {'cuda:0': 1073741824, 'cpu': 500000000}
    """
    if max_memory is None:
        return {}
    if isinstance(max_memory, str):
        max_memory = dict(split_assignments(max_memory, key="DEVICE", example="0=24GiB,cpu=64GiB"))
    budgets = {}
    for device, size in max_memory.items():
        name = normalize_device(device)
        if name == "meta":
            raise DeviceMapError("'meta' holds no data and cannot have a budget; name a real device")
        budgets[name] = parse_size(size)
    return budgets


def planning_budgets(
    max_memory: dict[DeviceLike, int | str] | str | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> dict[str, int]:
    """Budgets for planning: this machine's free memory, overridden by ``max_memory``.

    Devices named in ``max_memory`` need not exist here, so a plan for a machine one
    does not have can be made on a laptop.

    >>> planning_budgets({0: "80GiB"})["cuda:0"]
    85899345920
    """
    given = parse_max_memory(max_memory)
    measured = [device for device in available_devices() if device not in given]
    # One child process measures every GPU at once, rather than one child per GPU.
    gpus = free_gpu_memory([int(device[5:]) for device in measured if device.startswith("cuda:")])
    budgets = {
        device: gpus[int(device[5:])] if device.startswith("cuda:") else free_memory(device, offload_folder)
        for device in measured
    }
    budgets |= given
    return dict(sorted(budgets.items(), key=lambda item: device_order(item[0])))


def loading_budgets(
    max_memory: dict[DeviceLike, int | str] | str | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> dict[str, int]:
    """Budgets for loading: like :func:`planning_budgets`, but every device must exist here."""
    budgets = planning_budgets(max_memory, offload_folder)
    check_devices_exist(budgets)
    return budgets


def check_devices_exist(devices) -> None:
    """Raise DeviceNotFoundError naming every device in ``devices`` that this machine lacks."""
    present = set(available_devices())
    missing = sorted(set(devices) - present, key=device_order)
    if missing:
        raise DeviceNotFoundError(
            f"device(s) {', '.join(missing)} do not exist on this machine, which has "
            f"{', '.join(available_devices())}; remove them from max_memory or the device map "
            "(devicemap plan accepts hypothetical devices, loading does not)"
        )


def cuda_runtime_reserve() -> int:
    """Bytes a process holds on each GPU it computes on beside its tensors: ``$DEVICEMAP_CUDA_RESERVE`` or the default.

    >>> cuda_runtime_reserve() == CUDA_RUNTIME_RESERVE_BYTES or CUDA_RESERVE_ENV in os.environ
    True
    """
    configured = os.environ.get(CUDA_RESERVE_ENV, "").strip()
    if not configured:
        return CUDA_RUNTIME_RESERVE_BYTES
    if configured == "0":
        return 0
    try:
        return parse_size(configured)
    except DeviceMapError:
        raise DeviceMapError(
            f"{CUDA_RESERVE_ENV}={configured!r} is not a size; write one with a unit, e.g. 1GiB or 512MiB, "
            f"0 for none, or unset it for the default {format_size(CUDA_RUNTIME_RESERVE_BYTES)}"
        ) from None


def runtime_reserves(devices: Iterable[str]) -> dict[str, int]:
    """The runtime reserve of each of ``devices`` that has one: every GPU ("cuda:N"), none elsewhere.

    >>> list(runtime_reserves(["cuda:0", "cuda:1", "cpu", "disk"]))
    ['cuda:0', 'cuda:1']
    """
    reserve = cuda_runtime_reserve()
    return {device: reserve for device in devices if device.startswith("cuda:")}


def describe_budgets(budgets: dict[str, int]) -> str:
    """One line for messages: "cuda:0 24.0 GiB, cpu 64.0 GiB"."""
    return ", ".join(f"{device} {format_size(size)}" for device, size in budgets.items())
