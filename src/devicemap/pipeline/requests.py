"""Prompts to a pipeline Request: left padding, the model's special tokens, checked token ids.

``generate`` wants every prompt's real tokens at the right end of its row (left padding),
so that each sequence's next token goes right after its last real one. Prompts given as
token lists of any lengths, or padded on the right, are re-aligned to the left here.
"""

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import GenerationConfig, PretrainedConfig

from ..errors import DeviceMapError
from .schedule import Request, Sampling

Prompts = torch.Tensor | Sequence[Sequence[int]]


def special_tokens(
    model: Path,
    config: PretrainedConfig,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> tuple[tuple[int, ...], int]:
    """The EOS token ids and the pad token id: as given, else the model's own.

    The model's come from generation_config.json, else config.json; with no pad token the
    first EOS pads, as in ``generate``; with neither, token 0 (it only fills masked places).
    """
    try:
        generation = GenerationConfig.from_pretrained(model)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    eos = _as_tuple(generation.eos_token_id if eos_token_id is None else eos_token_id)
    pad = pad_token_id if pad_token_id is not None else generation.pad_token_id
    return eos, pad if pad is not None else (eos or (0,))[0]


def build_request(
    prompts: Prompts,
    attention_mask: torch.Tensor | None,
    *,
    model: Path,
    config: PretrainedConfig,
    max_new_tokens: int,
    micro_batches: int,
    sampling: Sampling,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> Request:
    """Check and left-align the prompts, and bundle them with how to continue them.

    The EOS and pad tokens are as given, else the model's (see :func:`special_tokens`).
    """
    eos, pad = special_tokens(model, config, eos_token_id, pad_token_id)
    if max_new_tokens < 1:
        raise DeviceMapError(f"max_new_tokens {max_new_tokens} must be at least 1")
    if micro_batches < 1:
        raise DeviceMapError(f"micro_batches {micro_batches} must be at least 1")
    input_ids, mask = _left_padded(prompts, attention_mask, pad)
    _require_in_vocabulary(input_ids[mask.bool()], config.vocab_size)
    return Request(input_ids, mask, max_new_tokens, eos, pad, micro_batches, sampling)


def _as_tuple(token_ids: int | Sequence[int] | None) -> tuple[int, ...]:
    if token_ids is None:
        return ()
    if isinstance(token_ids, int):
        return (token_ids,)
    return tuple(int(token) for token in token_ids)


def _left_padded(prompts: Prompts, attention_mask: torch.Tensor | None, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(prompts, torch.Tensor):
        if attention_mask is not None:
            raise DeviceMapError("attention_mask goes with a padded tensor of input_ids; token lists need none")
        return _pad_left([list(row) for row in prompts], pad)
    if prompts.ndim != 2:
        raise DeviceMapError(f"input_ids has shape {list(prompts.shape)}; pass [batch, tokens]")
    mask = torch.ones_like(prompts) if attention_mask is None else attention_mask.to(torch.int64)
    if mask.shape != prompts.shape:
        raise DeviceMapError(
            f"attention_mask has shape {list(mask.shape)} but input_ids has {list(prompts.shape)}; they must match"
        )
    if _is_left_padded(mask):
        return prompts.to(torch.int64), mask
    return _pad_left([row[row_mask.bool()].tolist() for row, row_mask in zip(prompts, mask)], pad)


def _is_left_padded(mask: torch.Tensor) -> bool:
    """Every row is zeros, then ones, and ends with a one."""
    return bool((mask[:, -1] == 1).all() and (mask[:, 1:] >= mask[:, :-1]).all())


def _pad_left(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not rows or any(len(row) == 0 for row in rows):
        raise DeviceMapError("every prompt needs at least one token; an empty prompt has nothing to continue")
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.int64)
    return input_ids, mask


def _require_in_vocabulary(tokens: torch.Tensor, vocab_size: int) -> None:
    outside = tokens[(tokens < 0) | (tokens >= vocab_size)]
    if outside.numel():
        raise DeviceMapError(
            f"token id {int(outside[0])} is outside the model's vocabulary of {vocab_size} tokens "
            f"({outside.numel()} such token(s) in the prompts); tokenize with the model's own tokenizer"
        )
