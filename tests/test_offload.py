"""Offload files: a block's tensors streamed into one safetensors file, whole or in pieces."""

import threading

import pytest
import torch
from safetensors.torch import load_file

from devicemap.errors import DeviceMapError
from devicemap.storage.offload import OffloadFiles
from devicemap.storage.safetensors_file import write_safetensors

SPECS = [("small", torch.bfloat16, (3,)), ("large", torch.float32, (4, 5))]
TENSORS = {"small": torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16), "large": torch.randn(4, 5)}


def in_pieces(tensor: torch.Tensor, size: int):
    """Consecutive flat pieces of ``tensor``, each in the same reused buffer, as a loader makes them."""
    buffer = torch.empty(size, dtype=tensor.dtype)
    flat = tensor.reshape(-1)
    for start in range(0, flat.numel(), size):
        piece = buffer[: min(size, flat.numel() - start)]
        piece.copy_(flat[start : start + size])
        yield piece


def test_a_block_written_whole_reads_back_equal(tmp_path):
    write_safetensors(tmp_path / "block.safetensors", SPECS, TENSORS.__getitem__)
    written = load_file(tmp_path / "block.safetensors")
    assert all(torch.equal(written[name], tensor) for name, tensor in TENSORS.items())


def test_a_tensor_given_in_pieces_from_one_reused_buffer_reads_back_whole(tmp_path):
    write_safetensors(tmp_path / "block.safetensors", SPECS, lambda name: in_pieces(TENSORS[name], 3))
    written = load_file(tmp_path / "block.safetensors")
    assert all(torch.equal(written[name], tensor) for name, tensor in TENSORS.items())


def test_pieces_that_fall_short_of_the_announced_shape_are_an_error(tmp_path):
    short = lambda name: in_pieces(TENSORS[name].reshape(-1)[:-1], 3)  # noqa: E731
    with pytest.raises(DeviceMapError, match=r"tensor 'large' came as 19 elements where torch.float32 \[4, 5\]"):
        write_safetensors(tmp_path / "block.safetensors", SPECS, short)


def test_pieces_of_another_dtype_are_an_error(tmp_path):
    wrong = lambda name: in_pieces(TENSORS[name].double(), 3)  # noqa: E731
    with pytest.raises(DeviceMapError, match=r"came as torch.float64 pieces where torch.float32 \[4, 5\]"):
        write_safetensors(tmp_path / "block.safetensors", SPECS, wrong)


def test_a_whole_tensor_of_another_shape_is_an_error_before_it_is_written(tmp_path):
    wrong = {**TENSORS, "large": torch.randn(5, 4)}
    with pytest.raises(DeviceMapError, match=r"came as torch.float32 \[5, 4\] where torch.float32 \[4, 5\]"):
        write_safetensors(tmp_path / "block.safetensors", SPECS, wrong.__getitem__)


def test_threads_writing_blocks_at_once_each_get_a_file_of_their_own(tmp_path):
    files = OffloadFiles(tmp_path)
    mapped: dict[int, dict[str, torch.Tensor]] = {}

    def write(index: int) -> None:
        mapped[index] = files.write_block(f"model.layers.{index}", SPECS, TENSORS.__getitem__)

    threads = [threading.Thread(target=write, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(list(files.folder.glob("*.safetensors"))) == 8
    assert all(torch.equal(block["large"], TENSORS["large"]) for block in mapped.values())
    files.discard()
    assert list(tmp_path.iterdir()) == []
