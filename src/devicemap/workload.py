"""What the model will be asked to do: how many sequences, how long, and the KV cache's dtype."""

from dataclasses import dataclass

import torch

from .errors import DeviceMapError

DEFAULT_MAX_TOKENS = 4096


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name of a dtype: torch.bfloat16 or "bf16" -> "bfloat16"."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "fp64": "float64", "double": "float64"}
    name = aliases.get(dtype.strip().lower(), dtype.strip().lower().removeprefix("torch."))
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise DeviceMapError(
            f"dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16', 'float16' or 'float32'"
        )
    return name


def dtype_bytes(dtype: torch.dtype | str) -> int:
    """Bytes per element of a dtype."""
    return getattr(torch, dtype_name(dtype)).itemsize


@dataclass(frozen=True)
class Workload:
    """The largest job the plan must leave room for.

    ``max_tokens`` counts prompt and generated tokens of one sequence; ``None`` means the
    model's context or 4096, whichever is smaller. ``kv_dtype`` ``None`` means the load dtype.

    >>> Workload(batch_size=4, max_tokens=8192, kv_dtype="bfloat16")
    Workload(batch_size=4, max_tokens=8192, kv_dtype='bfloat16')
    """

    batch_size: int = 1
    max_tokens: int | None = None
    kv_dtype: str | None = None

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DeviceMapError(f"Workload batch_size {self.batch_size!r} must be an int of at least 1")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise DeviceMapError(f"Workload max_tokens {self.max_tokens!r} must be an int of at least 1")
        if self.kv_dtype is not None:
            object.__setattr__(self, "kv_dtype", dtype_name(self.kv_dtype))

    def resolve(self, max_context: int | None, load_dtype: str) -> "Workload":
        """The same workload with every default filled in for a model."""
        max_tokens = self.max_tokens or min(max_context or DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS)
        return Workload(self.batch_size, max_tokens, self.kv_dtype or load_dtype)
