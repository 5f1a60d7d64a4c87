"""A disk that fills while offload files are written: an error with the numbers, and nothing left behind."""

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from devicemap.errors import DeviceMapError
from devicemap.runtime.load import load
from devicemap.storage.offload import OffloadFiles
from devicemap.storage.shards import write_sharded
from devicemap.units import format_size

# One disk block of about 6.5 MiB at bfloat16, converted from float32 into a 4 MiB filesystem.
CONFIG = dict(
    vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=8,
    num_key_value_heads=8, tie_word_embeddings=False,
)  # fmt: skip
LAYER_1_ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                   "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
DISK_FULL = re.compile(
    r"the disk holding offload folder (?P<parent>\S+) filled up \(No space left on device\) after "
    r"(?P<written>[\d.]+) MiB of offloaded weights were written into (?P<folder>\S+); the (?P<blocks>\d+) disk "
    r"block\(s\) of this load need (?P<needed>[\d.]+ MiB): free at least (?P<more>[\d.]+) MiB more on that disk, "
    r"pass offload_folder on a disk with more room, or lower the disk budget"
)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for this test (needs root, as in this project's sandbox)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small filesystem")
    mount = ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def checkpoint(folder: Path) -> tuple[Path, int]:
    """A float32 Llama folder, and its layer 1's bytes at bfloat16."""
    config = LlamaConfig(**CONFIG)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder.mkdir()
    write_sharded(folder, model.state_dict(), 1)
    config.save_pretrained(folder)
    return folder, sum(p.numel() * 2 for p in model.model.layers[1].parameters())


def test_a_disk_that_fills_during_a_load_is_an_error_with_the_numbers_and_leaves_nothing(small_disk, tmp_path):
    folder, layer_bytes = checkpoint(tmp_path / "model")
    with pytest.raises(DeviceMapError) as raised, pytest.warns(UserWarning, match="its budget is 4.0 MiB"):
        load(folder, device_map=LAYER_1_ON_DISK, dtype=torch.bfloat16, offload_folder=small_disk)
    found = DISK_FULL.search(str(raised.value))
    assert found, str(raised.value)
    assert Path(found["parent"]) == small_disk
    assert Path(found["folder"]).parent == small_disk and found["folder"].endswith(".partial")
    assert found["blocks"] == "1"
    assert found["needed"] == format_size(layer_bytes) == "6.5 MiB"
    assert 3.5 <= float(found["written"]) <= 4.0
    assert float(found["more"]) == pytest.approx(6.5 - float(found["written"]), abs=0.11)
    assert list(small_disk.iterdir()) == []
    assert shutil.disk_usage(small_disk).used < 64 * 1024


def test_the_bytes_needed_count_every_block_begun(small_disk):
    files = OffloadFiles(small_disk)
    three_mib = [("w", torch.float32, (3 * 2**18,))]
    files.write_block("model.layers.0", three_mib, lambda name: torch.zeros(3 * 2**18))
    with pytest.raises(DeviceMapError) as raised:
        files.write_block("model.layers.1", three_mib, lambda name: torch.zeros(3 * 2**18))
    found = DISK_FULL.search(str(raised.value))
    assert (found["blocks"], found["needed"]) == ("2", "6.0 MiB")
    assert 3.5 <= float(found["written"]) <= 4.0
    files.discard()
    assert list(small_disk.iterdir()) == []


def test_the_bytes_needed_are_those_of_every_disk_block_of_the_load(small_disk, tmp_path):
    folder, layer_bytes = checkpoint(tmp_path / "model")
    both_layers_on_disk = {**LAYER_1_ON_DISK, "model.layers.0": "disk"}
    with pytest.raises(DeviceMapError) as raised, pytest.warns(UserWarning):
        load(folder, device_map=both_layers_on_disk, dtype=torch.bfloat16, offload_folder=small_disk)
    found = DISK_FULL.search(str(raised.value))
    assert found, str(raised.value)
    assert (found["blocks"], found["needed"]) == ("2", format_size(2 * layer_bytes))
    assert list(small_disk.iterdir()) == []
