"""Real architectures at full size, from their published configs, built on the meta device.

Nothing is allocated: a 405B model is a few thousand meta tensors. Built once per session.
"""

from functools import cache

import torch
from torch import nn

from benchmarks.published_configs import PUBLISHED
from devicemap.model.profile import Block, Profile, profile_config
from devicemap.model.skeleton import build_on_meta

BF16 = torch.bfloat16

FULL_SIZE = PUBLISHED


@cache
def meta_model(name: str, dtype: torch.dtype = BF16) -> nn.Module:
    return build_on_meta(FULL_SIZE[name](), dtype)


@cache
def full_profile(name: str, dtype: torch.dtype = BF16) -> Profile:
    return profile_config(FULL_SIZE[name](), dtype)


def blocks_by_name(profile: Profile) -> dict[str, Block]:
    return {block.name: block for block in profile.blocks}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as built, each shared tensor once."""
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
