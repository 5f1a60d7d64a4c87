"""How much transient memory a forward pass over one block needs, per token.

Read off the block's own projections, so it works for any module:

- four tensors as wide as the hidden state are alive through a decoder layer's
  sublayers: the embeddings' output, which the model's forward keeps until it returns;
  the layer's input, which the loop calling the layer keeps until the layer returns; the
  residual sum inside the layer; and the normalised copy that feeds the sublayer:
  ``4 × hidden``;
- the projections one module owns run close together and their outputs can be alive at
  once (q, k and v; gate and up), and the elementwise step that combines them (rotary
  embedding, ``act(gate) * up``, a bias or upcast) allocates one more tensor as wide as
  the widest: ``sum(widths) + max(widths)`` for that module;
- stacked expert weights (3-D parameters, one slice per expert) do the same for each of
  the ``num_experts_per_tok`` routed copies of a token, each of which also gathers its
  own copy of the token's hidden state to feed its expert;
- attention scores are not counted: SDPA and flash kernels never materialise them.

So a block needs ``4 × hidden + max over its modules`` values per token. A Llama-3-8B
layer peaks in its MLP: ``4·4096 + (14336 + 14336 + 4096) + 14336`` values per token.
Measured on the CPU (``runtime.measure``), a dense, an MoE and a sliding-window model
use 0.86 to 0.97 of the reserves planned from this (tests/test_measure.py).
The output head's logits are left out: the planner sizes them from the vocabulary,
knowing whether every position's logits are kept.
"""

from torch import nn
from transformers.pytorch_utils import Conv1D

HIDDEN_COPIES = 4  # hidden-wide tensors alive through a decoder layer (see above)


def activation_values_per_token(
    block: nn.Module, hidden_size: int, experts_per_token: int, head: nn.Module | None = None
) -> int:
    """Values alive at the peak of a forward over ``block``, per token; 0 for blocks that project nothing.

    >>> activation_values_per_token(nn.Linear(64, 256), hidden_size=64, experts_per_token=1)
    768
    """
    hidden = hidden_size or _first_input_width(block)
    # A block that is itself a projection (an embedding) is a group of one.
    groups = [[block], *(list(module.children()) for module in block.modules())]
    peaks = [_peak([_output_width(module) for module in group if module is not head]) for group in groups]
    peaks += [experts_per_token * _routed_peak(module, hidden) for module in block.modules()]
    if not any(peaks):
        return 0
    return HIDDEN_COPIES * hidden + max(peaks)


def _peak(widths: list[int]) -> int:
    widths = [width for width in widths if width]
    return sum(widths) + max(widths) if widths else 0


def _routed_peak(module: nn.Module, hidden: int) -> int:
    """One routed copy of a token: its gathered hidden state, then its expert's projections."""
    peak = _peak(_expert_widths(module, hidden))
    return hidden + peak if peak else 0


def _expert_widths(module: nn.Module, hidden: int) -> list[int]:
    return [_expert_width(tuple(p.shape[1:]), hidden) for p in module.parameters(recurse=False) if p.dim() == 3]


def _output_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, Conv1D):
        return module.nf
    return 0


def _expert_width(shape: tuple[int, int], hidden: int) -> int:
    """The expert-side width of a stacked expert weight, whichever way round it is stored."""
    rows, columns = shape
    if columns == hidden:
        return rows
    if rows == hidden:
        return columns
    return min(rows, columns)


def _first_input_width(block: nn.Module) -> int:
    for module in block.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
        if isinstance(module, Conv1D):
            return module.weight.shape[0]
    return 0
