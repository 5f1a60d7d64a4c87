import json

import pytest
import torch
from safetensors.torch import load_file

from devicemap.errors import CheckpointError
from devicemap.storage.checkpoint import open_checkpoint
from devicemap.storage.safetensors_file import read_safetensors_header, specs_of, write_safetensors
from devicemap.storage.shards import write_sharded


def _mixed_tensors() -> dict[str, torch.Tensor]:
    return {
        "half": torch.randn(3, dtype=torch.bfloat16),
        "flags": torch.tensor([True, False, True]),
        "ids": torch.arange(5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(7, 3).t(),
    }


def test_a_written_file_reads_back_equal_with_safetensors_itself(tmp_path):
    tensors = _mixed_tensors()
    write_safetensors(tmp_path / "mixed.safetensors", specs_of(tensors), tensors.__getitem__)
    loaded = load_file(tmp_path / "mixed.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_every_tensor_starts_at_a_multiple_of_its_element_size(tmp_path):
    tensors = _mixed_tensors()
    write_safetensors(tmp_path / "mixed.safetensors", specs_of(tensors), tensors.__getitem__)
    for info in read_safetensors_header(tmp_path / "mixed.safetensors").values():
        assert info.start_byte % info.dtype.itemsize == 0, info.name


def test_shards_hold_consecutive_tensors_of_about_equal_bytes(tmp_path):
    tensors = {f"layer.{i}": torch.ones(1000 + i) for i in range(12)}
    paths = write_sharded(tmp_path, tensors, shard_count=4)
    assert [path.name for path in paths] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert list(weight_map) == list(tensors)
    assert [list(weight_map.values()).count(path.name) for path in paths] == [3, 3, 3, 3]


def test_a_large_tensor_gets_a_shard_of_its_own_without_leaving_one_empty(tmp_path):
    tensors = {
        "small.0": torch.ones(10),
        "big": torch.ones(10_000),
        "small.1": torch.ones(10),
        "small.2": torch.ones(10),
    }
    paths = write_sharded(tmp_path, tensors, shard_count=3)
    assert [sorted(load_file(path)) for path in paths] == [["small.0"], ["big"], ["small.1", "small.2"]]


def test_one_shard_is_a_plain_model_safetensors_without_index(tmp_path):
    paths = write_sharded(tmp_path, {"w": torch.ones(2)}, shard_count=1)
    assert [path.name for path in paths] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_a_tensor_saved_under_two_names_is_written_once_under_the_first(tmp_path):
    embedding = torch.randn(8, 4)
    write_sharded(
        tmp_path, {"embed.weight": embedding, "head.weight": embedding, "norm": torch.ones(4)}, shard_count=2
    )
    (tmp_path / "config.json").write_text("{}")
    assert list(open_checkpoint(tmp_path).tensors) == ["embed.weight", "norm"]


def test_more_shards_than_tensors_gives_one_shard_per_tensor(tmp_path):
    assert len(write_sharded(tmp_path, {"a": torch.ones(1), "b": torch.ones(1)}, shard_count=5)) == 2


def test_a_dtype_safetensors_cannot_store_is_an_error_naming_the_tensor(tmp_path):
    with pytest.raises(CheckpointError, match="tensor 'phase' has dtype torch.complex64"):
        write_safetensors(tmp_path / "x.safetensors", [("phase", torch.complex64, (2,))], lambda name: torch.ones(2))
    assert not (tmp_path / "x.safetensors").exists()
