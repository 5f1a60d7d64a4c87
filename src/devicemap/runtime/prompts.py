"""Prompts as token ids for ``generate``: left-padded, so each row's next token follows its last real one."""

from collections.abc import Sequence

import torch


def tokenize(
    tokenizer, prompts: Sequence[str], chat: bool = False, system: str | None = None
) -> dict[str, torch.Tensor]:
    """Left-padded token ids and mask for ``prompts``, wrapped in the chat template when ``chat``.

    ``system``, when given with ``chat``, is the chat's system message.

    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast
    >>> words = Tokenizer(models.WordLevel({"<eos>": 0, "Hi": 1, "Hello": 2, "there": 3}, unk_token="<eos>"))
    >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>")
    >>> tokenize(tokenizer, ["Hi", "Hello there"])["input_ids"]
    tensor([[0, 1],
            [2, 3]])
    """
    if chat:
        opening = [{"role": "system", "content": system}] if system is not None else []
        prompts = [
            tokenizer.apply_chat_template(
                [*opening, {"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not chat)
