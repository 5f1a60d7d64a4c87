"""Whether the GPUs a model is placed on compute in its dtypes: bfloat16 needs compute capability 8.0.

GPUs before Ampere (compute capability below 8.0: V100, T4, RTX 20xx) have no bfloat16
arithmetic. torch's ``is_bf16_supported()`` still says True for most of them, because it
counts emulation, and asks only about the current device; a model placed there in bfloat16
runs slowly or fails in a kernel far from the cause. So each CUDA device is asked for its
own capability, before anything is placed.
"""

from collections.abc import Iterable

import torch

from ..devices import device_order
from ..errors import DeviceMapError

BFLOAT16_CAPABILITY = (8, 0)


def check_dtype_supported(device: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> None:
    """Raise a DeviceMapError when CUDA ``device``, of compute ``capability``, lacks ``dtype``.

    ``capability`` is ``None`` for a device that has no compute capability to check (the
    CPU, disk, a ROCm GPU, which all compute in bfloat16).

    >>> check_dtype_supported("cuda:0", torch.bfloat16, (8, 6))
    >>> check_dtype_supported("cuda:1", torch.float16, (7, 0))
    """
    if dtype != torch.bfloat16 or capability is None or capability >= BFLOAT16_CAPABILITY:
        return
    raise DeviceMapError(
        f"{device} (compute capability {capability[0]}.{capability[1]}) has no bfloat16 arithmetic, "
        f"which needs compute capability {BFLOAT16_CAPABILITY[0]}.{BFLOAT16_CAPABILITY[1]} (Ampere) or newer, "
        f"and this model would keep bfloat16 tensors there; load it with dtype=torch.float16 (the same "
        f"memory as bfloat16; a model trained in bfloat16 may overflow in it) or dtype=torch.float32 (twice "
        f"the memory), or map its blocks to other devices"
    )


def cuda_capability(device: str) -> tuple[int, int] | None:
    """The compute capability of CUDA GPU ``device``; ``None`` for any other device, for ROCm GPUs,
    and for a GPU this machine lacks (placing a tensor there says so, as it always has).

    >>> cuda_capability("cpu") is None
    True
    """
    if not device.startswith("cuda:") or torch.version.hip:
        return None
    index = int(device.removeprefix("cuda:"))
    return torch.cuda.get_device_capability(index) if index < torch.cuda.device_count() else None


def require_supported_dtypes(placed: Iterable[tuple[str, torch.dtype]]) -> None:
    """Raise a DeviceMapError for the first ``(device, dtype)`` of ``placed`` that the device cannot compute in.

    >>> require_supported_dtypes([("cpu", torch.bfloat16), ("disk", torch.bfloat16)])
    """
    for device, dtype in sorted(set(placed), key=lambda pair: (device_order(pair[0]), str(pair[1]))):
        if dtype == torch.bfloat16:
            check_dtype_supported(device, dtype, cuda_capability(device))
