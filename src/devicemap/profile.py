"""A model as plain data: its execution blocks, their bytes, ties and per-token cache.

Everything the planner needs about a model and nothing else, so that planning a
671B model is arithmetic over a few hundred small records.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """One unit of placement, never split across devices: a module such as "model.layers.3".

    ``weight_bytes`` counts parameters at the load dtype (or the dtype the model keeps
    them in), excluding tensors already counted in an earlier block of a tie.
    ``kv_values_per_token`` is what one sequence caches per token in this block (keys and
    values, or a compressed latent), capped at ``kv_window`` tokens when the layer uses a
    sliding window; ``state_values`` is a fixed per-sequence state (linear attention,
    state-space layers). Both are counts of values; the workload's kv dtype sizes them.
    ``activation_bytes_per_token`` is the largest transient tensor of a forward pass over
    the block, per token of the batch, at the load dtype.
    """

    name: str
    weight_bytes: int
    buffer_bytes: int = 0
    kv_values_per_token: int = 0
    kv_window: int | None = None
    state_values: int = 0
    activation_bytes_per_token: int = 0
    tensor_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class Profile:
    """A model's blocks in execution order, with what ties them together.

    ``tied`` holds groups of block names that share a tensor and so must share a device;
    the shared bytes count in the first block of each group. ``head`` names the block
    that computes the output logits (``None`` for models without one).
    """

    name: str
    dtype: str
    blocks: tuple[Block, ...]
    tied: tuple[tuple[str, ...], ...] = ()
    head: str | None = None
    vocab_size: int = 0
    max_context: int | None = None
    module_names: tuple[str, ...] = ()
