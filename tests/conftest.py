"""Fixtures shared by the test files: the demo checkpoint and small random-weight checkpoints.

Session fixtures hand out folders that many tests read; a test that damages a
checkpoint builds its own in ``tmp_path``.
"""

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from models import save_random_model

from devicemap.storage.demo import CACHE_ENV, cache_dir, demo_model_path

RandomModelFolder = Callable[..., Path]


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The converted demo model's folder (SmolLM2-135M-Instruct, float32, 4 shards).

    It is converted once into the user's cache and reused by later runs; only when
    that cache cannot be written does this session convert into a temporary one.
    """
    with pytest.MonkeyPatch.context() as patch:
        if not _writable(cache_dir()):
            patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("devicemap-cache")))
        yield demo_model_path()


@pytest.fixture(scope="session")
def random_model_folder(tmp_path_factory: pytest.TempPathFactory) -> RandomModelFolder:
    """A function ``(kind, dtype=torch.float32, shards=3) -> Path`` giving a saved random model.

    Kinds are those of ``models.KINDS``; each folder is built once per session.

        folder = random_model_folder("qwen3-moe", torch.bfloat16)
    """
    folders: dict[tuple, Path] = {}

    def folder_of(kind: str, dtype: torch.dtype = torch.float32, shards: int = 3) -> Path:
        key = (kind, dtype, shards)
        if key not in folders:
            name = f"{kind}-{str(dtype).removeprefix('torch.')}-{shards}"
            folders[key] = save_random_model(kind, tmp_path_factory.mktemp(name), dtype, shards)
        return folders[key]

    return folder_of


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists and can be written, or could be created."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    return existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)


@pytest.fixture
def offload(tmp_path) -> Path:
    """An offload folder that already holds a file of someone else's."""
    folder = tmp_path / "offload"
    folder.mkdir()
    (folder / "theirs.txt").write_text("kept")
    return folder
