"""What the model will be asked to do: how many sequences, how long, the KV cache's dtype, the prefill's chunks."""

from dataclasses import dataclass

import torch

from .errors import DeviceMapError

DEFAULT_MAX_TOKENS = 4096
# Prompt tokens per prefill forward unless a Workload says otherwise. A prompt no longer than
# the chunk prefills as before, in one forward. Every later chunk attends to the cache through
# a mask, which costs SDPA its causal kernel whatever the chunk's size: measured on one CPU
# thread (generate, one new token), SmolLM2-135M at 4,096 tokens takes 1.24× the whole
# prefill's time in chunks of 1,024 and 1.21× in chunks of 2,048, and at 2,048 tokens 1.01×
# in chunks of 512; a tiny attention-bound Llama at 8,192 tokens 1.22× (1,024), 1.29×
# (2,048), 1.46× (4,096). Smaller chunks add their own overhead (1.20× in chunks of 256 at
# 1,024 tokens) and on GPUs fewer rows per matrix multiply; larger ones save less memory.
DEFAULT_PREFILL_CHUNK = 2048


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
    ``prefill_chunk`` is how many prompt tokens of each sequence one forward takes during the
    prefill (transformers' ``prefill_chunk_size``), so that activations are reserved for a
    chunk rather than the whole prompt; ``None`` means ``DEFAULT_PREFILL_CHUNK``, 0 means the
    whole prompt in one forward.

    >>> Workload(batch_size=4, max_tokens=8192, kv_dtype="bfloat16", prefill_chunk=1024).prefill_tokens
    1024
    """

    batch_size: int = 1
    max_tokens: int | None = None
    kv_dtype: str | None = None
    prefill_chunk: int | None = None

    def __post_init__(self):
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise DeviceMapError(f"Workload batch_size {self.batch_size!r} must be an int of at least 1")
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise DeviceMapError(f"Workload max_tokens {self.max_tokens!r} must be an int of at least 1")
        if self.kv_dtype is not None:
            object.__setattr__(self, "kv_dtype", dtype_name(self.kv_dtype))
        if self.prefill_chunk is not None and (
            isinstance(self.prefill_chunk, bool) or not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0
        ):
            raise DeviceMapError(
                f"Workload prefill_chunk {self.prefill_chunk!r} must be an int of at least 0: prompt tokens per prefill "
                f"forward, e.g. {DEFAULT_PREFILL_CHUNK}, or 0 to prefill the whole prompt at once"
            )

    def resolve(self, max_context: int | None, load_dtype: str) -> "Workload":
        """The same workload with every default filled in for a model."""
        max_tokens = self.max_tokens or min(max_context or DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS)
        chunk = DEFAULT_PREFILL_CHUNK if self.prefill_chunk is None else self.prefill_chunk
        return Workload(self.batch_size, max_tokens, self.kv_dtype or load_dtype, chunk)

    @property
    def prefill_tokens(self) -> int | None:
        """Prompt tokens of one sequence in one prefill forward: a chunk, or ``max_tokens`` unchunked.

        A resolved workload only; one read from a plan made before chunks existed has none.
        """
        if not self.prefill_chunk or self.max_tokens is None:
            return self.max_tokens
        return min(self.prefill_chunk, self.max_tokens)
