"""Disk blocks computed on the CPU: read into reused buffers ahead of use when cold, computed in place when warm."""

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from benchmarks.speed_pages import disk_ranges, drop_pages
from devicemap.errors import DeviceMapError
from devicemap.planning.ledger import STREAM_COPIES
from devicemap.runtime.disk_reader import DiskReader, FileRun, ReadBlock, file_mappings, lay_out, read_runs
from devicemap.runtime.dispatch import blocks_of
from devicemap.runtime.load import load

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")

IDS = torch.tensor([[5, 17, 42, 99, 3]])
ALL_LAYERS_ON_DISK = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers": "disk", "model.norm": "cpu",
    "lm_head": "cpu",
}  # fmt: skip


def settle(paths) -> None:
    """Write the files' pages back, so that they can leave the page cache (dirty pages cannot)."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        os.fsync(descriptor)
        os.close(descriptor)


def in_a_file_mapping(tensor: torch.Tensor) -> bool:
    return any(m.start <= tensor.data_ptr() < m.end for m in file_mappings())


class DropsPagesAfterEachToken:
    """A ``generate`` streamer that makes the disk blocks cold before every step, as for a model bigger than memory."""

    def __init__(self, ranges):
        self.ranges = ranges

    def put(self, value) -> None:
        drop_pages(self.ranges)

    def end(self) -> None:
        pass


def record_where_weights_are(module: nn.Module) -> list[bool]:
    """Each time ``module`` runs, whether its weight lies in a file mapping (computed in place) or not (in a buffer)."""
    seen = []
    module.register_forward_pre_hook(lambda module, args: seen.append(in_a_file_mapping(module.weight)))
    return seen


@pytest.mark.parametrize("cold", [True, False], ids=["cold", "warm"])
def test_every_layer_on_disk_generates_the_plain_models_tokens_cold_or_warm(cold, random_model_folder, tmp_path):
    folder = random_model_folder("llama", torch.bfloat16)
    settle(folder.glob("*.safetensors"))
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    expected = plain.generate(IDS, max_new_tokens=8, do_sample=False)
    model = load(folder, device_map=ALL_LAYERS_ON_DISK, offload_folder=tmp_path)
    seen = record_where_weights_are(model.model.layers[3].mlp.up_proj)
    ranges = disk_ranges(folder, ALL_LAYERS_ON_DISK)
    streamer = DropsPagesAfterEachToken(ranges) if cold else None
    if cold:
        drop_pages(ranges)
    assert torch.equal(model.generate(IDS, max_new_tokens=8, do_sample=False, streamer=streamer), expected)
    assert len(seen) == 8
    assert seen == [not cold] * 8, "cold blocks run from the reader's buffers, warm ones on their mapping"


def file_view(path: Path, size_bytes: int) -> torch.Tensor:
    """The bytes of the file at ``path`` as a tensor viewing a private mapping of it."""
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size_bytes)
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (size_bytes,))


def test_tensors_next_to_each_other_in_a_file_are_read_in_one_run_aligned_as_in_the_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 16)
    data = file_view(path, 4096)
    first, second, apart = data[100:164], data[164:300], data[1000:1100]
    runs, offsets = lay_out([apart, second, first], file_mappings())
    assert [(run.offset, run.length_bytes) for run in runs] == [(100, 200), (1000, 100)]
    assert [run.slot_offset % 64 for run in runs] == [100 % 64, 1000 % 64]
    assert offsets[2] == runs[0].slot_offset and offsets[1] == runs[0].slot_offset + 64
    assert offsets[0] == runs[1].slot_offset >= runs[0].slot_offset + 200
    assert lay_out([torch.zeros(8)], file_mappings()) is None, "a tensor in plain memory has no file to read"


def linear_on_file(path: Path) -> nn.Linear:
    """A linear layer whose weight is a view of the file at ``path``, holding 0, 1, 2 … 15 as float32."""
    path.write_bytes(torch.arange(16, dtype=torch.float32).numpy().tobytes())
    layer = nn.Linear(4, 4, bias=False)
    layer.weight = nn.Parameter(file_view(path, 64).view(torch.float32).view(4, 4), requires_grad=False)
    return layer


def test_a_read_block_points_at_its_buffer_while_it_runs_and_at_its_mapping_after(tmp_path):
    layer = linear_on_file(tmp_path / "weights.bin")
    original = layer.weight
    with ThreadPoolExecutor(1) as executor:
        reader = DiskReader([ReadBlock("layer", ((layer._parameters, "weight"),))], executor, lambda name: True)
        assert reader.fetch_ahead("layer")
        reader.bind("layer")
        bound = layer.weight
        assert not in_a_file_mapping(bound) and torch.equal(bound, original)
        assert reader.unbind("layer")
    assert layer.weight is original


def test_a_block_already_in_memory_is_not_read_and_runs_on_its_mapping(tmp_path):
    layer = linear_on_file(tmp_path / "weights.bin")
    original = layer.weight
    with ThreadPoolExecutor(1) as executor:
        reader = DiskReader([ReadBlock("layer", ((layer._parameters, "weight"),))], executor, lambda name: False)
        assert reader.prepare("layer")
        reader.bind("layer")
        assert layer.weight is original
        assert not reader.unbind("layer")


def test_a_block_that_runs_out_of_turn_takes_the_buffer_of_one_still_to_come(tmp_path):
    layers = {name: linear_on_file(tmp_path / f"{name}.bin") for name in "abc"}
    blocks = [ReadBlock(name, ((layer._parameters, "weight"),)) for name, layer in layers.items()]
    with ThreadPoolExecutor(1) as executor:
        reader = DiskReader(blocks, executor, lambda name: True)
        assert reader.fetch_ahead("a") and reader.fetch_ahead("b")
        assert not reader.fetch_ahead("c"), f"{STREAM_COPIES} buffers, both kept for blocks to come"
        assert reader.prepare("c")
        reader.bind("c")
        assert not in_a_file_mapping(layers["c"].weight)
        assert reader.holds("c") and [reader.holds(name) for name in "ab"].count(True) == 1
        reader.unbind("c")


def test_a_file_cut_short_after_loading_is_an_error_that_names_it(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(100))
    with pytest.raises(DeviceMapError, match=r"weights.bin ended at byte 100 .* 64 bytes from byte 64"):
        read_runs([FileRun(str(path), 64, 64, 0)], memoryview(bytearray(64)))


def test_the_readers_buffers_are_the_room_the_plan_keeps_on_the_cpu_for_blocks_from_disk(random_model_folder, tmp_path):
    folder = random_model_folder("llama", torch.bfloat16)
    model = load(folder, device_map=ALL_LAYERS_ON_DISK, offload_folder=tmp_path)
    plan = model.devicemap_plan
    on_disk = [block for block in blocks_of(model, plan) if block.placement.device == "disk"]
    readable = [ReadBlock(b.placement.block, tuple((t.owner, t.key) for t in b.tensors)) for b in on_disk]
    reader = DiskReader(readable, executor=None, needs_reading=lambda name: True)
    (cpu,) = [row for row in plan.ledger if row.device == "cpu"]
    largest = max(sum(t.value.nbytes for t in block.tensors) for block in on_disk)
    assert reader.buffer_bytes >= STREAM_COPIES * largest
    # Each buffer may carry under 64 bytes per file run to keep tensors aligned, as the GPU's slots do.
    assert reader.buffer_bytes <= cpu.stream_bytes + STREAM_COPIES * 64 * len(model.model.layers)
