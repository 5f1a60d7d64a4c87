"""Disk blocks made cold before every step, as for a model bigger than memory: the tokens stay the plain model's."""

import os
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.speed_pages import disk_ranges, drop_pages, read_bytes
from devicemap.runtime.load import load

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps and /proc/self/io")

IDS = torch.tensor([[5, 17, 42, 99, 3]])
ALL_LAYERS_ON_DISK = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
    "lm_head": "cpu",
}  # fmt: skip


class DropsPagesAfterEachToken:
    """A ``generate`` streamer that makes the disk blocks cold before every step, and counts the disk reads of each."""

    def __init__(self, ranges):
        self.ranges = ranges
        self.reads_bytes: list[int] = []
        self._before = read_bytes()

    def put(self, value) -> None:
        self.reads_bytes.append(read_bytes() - self._before)
        drop_pages(self.ranges)
        self._before = read_bytes()

    def end(self) -> None:
        pass


@pytest.fixture(scope="module")
def llama_bf16(random_model_folder):
    """A random Llama checkpoint at bfloat16 (its disk blocks are views of its own files), written back to disk."""
    folder = random_model_folder("llama", torch.bfloat16)
    for path in folder.glob("*.safetensors"):
        with path.open("rb") as file:
            os.fsync(file.fileno())  # only clean pages leave the page cache
    return folder


@pytest.fixture(scope="module")
def plain_tokens(llama_bf16):
    plain = AutoModelForCausalLM.from_pretrained(llama_bf16, dtype=torch.bfloat16)
    return plain.generate(IDS, max_new_tokens=8, do_sample=False)


def test_every_layer_on_disk_made_cold_before_every_step_generates_the_plain_models_tokens(
    llama_bf16, plain_tokens, tmp_path
):
    model = load(llama_bf16, device_map=ALL_LAYERS_ON_DISK, offload_folder=tmp_path)
    ranges = disk_ranges(llama_bf16, ALL_LAYERS_ON_DISK)
    drop_pages(ranges)
    streamer = DropsPagesAfterEachToken(ranges)
    assert torch.equal(model.generate(IDS, max_new_tokens=8, do_sample=False, streamer=streamer), plain_tokens)
    # The streamer is given the prompt first; after it, each step read its layers from disk again.
    assert len(streamer.reads_bytes) == 9 and all(read > 0 for read in streamer.reads_bytes[1:])


def test_every_layer_on_disk_in_memory_generates_the_plain_models_tokens_without_reading_the_disk(
    llama_bf16, plain_tokens, tmp_path
):
    model = load(llama_bf16, device_map=ALL_LAYERS_ON_DISK, offload_folder=tmp_path)
    model.generate(IDS, max_new_tokens=1, do_sample=False)
    before = read_bytes()
    assert torch.equal(model.generate(IDS, max_new_tokens=8, do_sample=False), plain_tokens)
    assert read_bytes() == before
