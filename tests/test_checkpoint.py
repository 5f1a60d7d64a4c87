import gc
import json
import shutil
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from devicemap.errors import CheckpointError
from devicemap.storage.checkpoint import open_checkpoint
from devicemap.storage.safetensors_file import read_safetensors_header
from devicemap.storage.shards import write_sharded


@pytest.fixture
def llama(random_model_folder, tmp_path) -> Path:
    """A private copy of a 3-shard Llama folder that a test may damage."""
    return Path(shutil.copytree(random_model_folder("llama"), tmp_path / "llama"))


def _shard_names(folder: Path) -> list[str]:
    return sorted(
        set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    )


def _anonymous_bytes() -> int:
    """Process memory not backed by a file: what a copy of a tensor would add to."""
    memory = psutil.Process().memory_info()
    return memory.rss - memory.shared


def test_a_sharded_folder_lists_every_tensor_with_its_file_dtype_shape_and_offsets(llama):
    checkpoint = open_checkpoint(llama)
    assert checkpoint.file_format == "safetensors"
    assert [path.name for path in checkpoint.files] == _shard_names(llama)
    info = checkpoint.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert (info.dtype, info.shape, info.size_bytes) == (torch.float32, (32, 64), 32 * 64 * 4)
    with safe_open(info.file, framework="pt") as reference:
        assert info.name in reference.keys()
    assert (
        info.file.read_bytes()[info.start_byte : info.end_byte]
        == checkpoint.tensor(info.name).numpy().tobytes()
    )


def test_tensors_come_in_file_then_byte_order(llama):
    infos = list(open_checkpoint(llama).tensors.values())
    positions = [(info.file.name, info.start_byte) for info in infos]
    assert positions == sorted(positions)


def test_every_tensor_equals_what_safetensors_reads(random_model_folder):
    checkpoint = open_checkpoint(random_model_folder("t5", torch.bfloat16))
    for name, info in checkpoint.tensors.items():
        with safe_open(info.file, framework="pt") as reference:
            assert torch.equal(checkpoint.tensor(name), reference.get_tensor(name)), name


def test_a_folder_with_one_safetensors_file_and_no_index_opens(random_model_folder):
    checkpoint = open_checkpoint(random_model_folder("gpt2", shards=1))
    assert [path.name for path in checkpoint.files] == ["model.safetensors"]
    assert "transformer.h.3.attn.c_attn.weight" in checkpoint.tensors


def test_a_tensor_is_a_view_into_its_files_mapping_not_a_copy(llama):
    checkpoint = open_checkpoint(llama)
    first, second = [info for info in checkpoint.tensors.values() if info.file == checkpoint.files[0]][:2]
    storage = checkpoint.tensor(first.name).untyped_storage()
    assert storage.nbytes() == first.file.stat().st_size
    assert checkpoint.tensor(second.name).untyped_storage().data_ptr() == storage.data_ptr()
    assert checkpoint.tensor(second.name).data_ptr() - storage.data_ptr() == second.start_byte


def test_reading_a_tensor_adds_page_cache_not_process_memory(tmp_path):
    size_bytes = 64 * 2**20
    write_sharded(tmp_path, {"big": torch.ones(size_bytes // 4)}, shard_count=1)
    (tmp_path / "config.json").write_text("{}")
    before = _anonymous_bytes()
    tensor = open_checkpoint(tmp_path).tensor("big")
    assert tensor.sum().item() == size_bytes // 4
    assert _anonymous_bytes() - before < size_bytes // 4


def test_tensors_stay_readable_after_the_checkpoint_is_gone(llama):
    checkpoint = open_checkpoint(llama)
    tensor = checkpoint.tensor("model.norm.weight")
    expected = tensor.clone()
    del checkpoint
    gc.collect()
    assert torch.equal(tensor, expected)


def test_writing_to_a_tensor_never_reaches_the_file(llama):
    checkpoint = open_checkpoint(llama)
    info = checkpoint.tensors["model.norm.weight"]
    on_disk = info.file.read_bytes()
    checkpoint.tensor(info.name).fill_(7.0)
    assert info.file.read_bytes() == on_disk


def test_tensor_to_at_the_files_dtype_on_cpu_is_the_file_view_itself(llama):
    checkpoint = open_checkpoint(llama)
    tensor = checkpoint.tensor_to("lm_head.weight", "cpu")
    assert tensor.untyped_storage().nbytes() == checkpoint.tensors["lm_head.weight"].file.stat().st_size


def test_tensor_to_converts_the_dtype_into_a_new_tensor(llama):
    checkpoint = open_checkpoint(llama)
    converted = checkpoint.tensor_to("lm_head.weight", "cpu", torch.bfloat16)
    assert converted.dtype == torch.bfloat16
    assert torch.equal(converted, checkpoint.tensor("lm_head.weight").to(torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_to_an_accelerator_arrives_there_at_the_requested_dtype(llama):
    checkpoint = open_checkpoint(llama)
    moved = checkpoint.tensor_to("lm_head.weight", "cuda:0", torch.bfloat16)
    assert (moved.device.type, moved.dtype) == ("cuda", torch.bfloat16)
    assert torch.equal(moved.cpu(), checkpoint.tensor("lm_head.weight").to(torch.bfloat16))


def test_an_unknown_tensor_name_is_an_error_suggesting_close_names(llama):
    with pytest.raises(CheckpointError, match="no tensor 'model.norm.weights'.*model.norm.weight"):
        open_checkpoint(llama).tensor("model.norm.weights")


def test_a_missing_folder_is_an_error_saying_what_a_model_folder_holds(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere does not exist; pass a folder holding config.json"):
        open_checkpoint(tmp_path / "nowhere")


def test_a_weight_file_given_instead_of_its_folder_is_an_error_naming_the_folder_to_pass(llama):
    with pytest.raises(CheckpointError, match="is a file, not a folder; pass the folder that holds it"):
        open_checkpoint(llama / _shard_names(llama)[0])


def test_a_folder_without_config_json_is_an_error(llama):
    (llama / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"has no config.json; .*copy it there"):
        open_checkpoint(llama)


def test_a_folder_without_weights_is_an_error_listing_what_it_holds(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(CheckpointError, match=r"holds no weights .* it holds: README.md, config.json"):
        open_checkpoint(tmp_path)


def test_shards_without_an_index_are_an_error_asking_for_the_index(llama):
    (llama / "model.safetensors.index.json").unlink()
    with pytest.raises(CheckpointError, match=r"holds 3 weight files .* but no model.safetensors.index.json"):
        open_checkpoint(llama)


def test_a_shard_named_in_the_index_but_absent_is_an_error_naming_it(llama):
    missing = _shard_names(llama)[1]
    (llama / missing).unlink()
    with pytest.raises(
        CheckpointError, match=rf"1 shard file\(s\) that are not there: {missing} \(\d+ tensors\)"
    ):
        open_checkpoint(llama)


def test_an_index_that_is_not_json_is_an_error(llama):
    (llama / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="is not valid JSON with a 'weight_map'"):
        open_checkpoint(llama)


def test_an_index_naming_files_outside_the_folder_is_an_error(llama):
    index_path = llama / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names files outside its folder \(../elsewhere.safetensors\)"):
        open_checkpoint(llama)


def test_an_index_naming_tensors_a_shard_lacks_is_an_error_listing_them(llama):
    index_path = llama / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = _shard_names(llama)[0]
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    index["weight_map"]["model.extra.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(llama)
    assert (
        f"2 tensor(s) that their shard does not hold: model.layers.9.mlp.up_proj.weight (in {shard})"
        in str(error.value)
    )
    assert f"model.extra.weight (in {shard})" in str(error.value)


def test_a_truncated_shard_is_an_error_with_the_bytes_missing(llama):
    shard = llama / _shard_names(llama)[2]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(llama)
    message = str(error.value)
    assert f"{shard} is corrupt or truncated" in message
    assert f"the file has only {len(data) - 1000} bytes (1000 missing): it is truncated" in message
    assert "Download or copy the file again" in message


def test_a_header_length_beyond_the_file_is_an_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(
        CheckpointError, match="its header claims 1000000 bytes but the file has 10 bytes in all"
    ):
        read_safetensors_header(path)


def test_a_file_shorter_than_the_header_length_is_an_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match="it has 2 bytes, fewer than the 8-byte header length"):
        read_safetensors_header(path)


def test_a_header_that_is_not_json_is_an_error(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes((8).to_bytes(8, "little") + b'{"a": [}')
    with pytest.raises(CheckpointError, match="its header is not valid JSON"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    "entry, reason",
    [
        ({"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}, "has an invalid header entry"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "has an invalid shape or offsets"),
        (
            {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]},
            "spans 8 bytes but torch.float32 \\[3\\] needs 12",
        ),
    ],
)
def test_a_header_entry_that_does_not_describe_its_bytes_is_an_error_naming_the_tensor(
    tmp_path, entry, reason
):
    header = json.dumps({"weight": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=f"tensor 'weight' {reason}"):
        read_safetensors_header(path)


def test_a_misaligned_tensor_is_read_correctly_by_one_copy(tmp_path):
    values = torch.arange(3, dtype=torch.float32)
    header = json.dumps(
        {
            "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
            "w": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]},
        }
    ).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\x01" + values.numpy().tobytes()
    )
    (tmp_path / "config.json").write_text("{}")
    assert torch.equal(open_checkpoint(tmp_path).tensor("w"), values)


def _save_pickle_folder(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save(tensors, folder / "pytorch_model.bin")
    return folder


def test_a_pickle_checkpoint_is_refused_without_an_explicit_opt_in(tmp_path):
    folder = _save_pickle_folder(tmp_path / "model", {"w": torch.ones(2)})
    with pytest.raises(CheckpointError) as error:
        open_checkpoint(folder)
    message = str(error.value)
    assert "holds only pickle checkpoints (pytorch_model.bin)" in message
    assert "can run arbitrary code" in message
    assert "allow_pickle=True" in message


def test_a_pickle_checkpoint_with_the_opt_in_reads_file_backed_tensors(tmp_path):
    tensors = {"w": torch.randn(4, 3), "b": torch.arange(5)}
    folder = _save_pickle_folder(tmp_path / "model", tensors)
    checkpoint = open_checkpoint(folder, allow_pickle=True)
    assert checkpoint.file_format == "pickle"
    assert checkpoint.tensors["w"].shape == (4, 3)
    assert torch.equal(checkpoint.tensor("w"), tensors["w"])
    assert torch.equal(checkpoint.tensor_to("b", "cpu", torch.float32), tensors["b"].float())


def test_a_pickle_holding_more_than_tensors_is_refused_even_with_the_opt_in(tmp_path):
    folder = _save_pickle_folder(tmp_path / "model", {"w": torch.ones(2), "when": psutil.Process})
    with pytest.raises(CheckpointError, match="holds more than tensors, which weights_only loading refuses"):
        open_checkpoint(folder, allow_pickle=True)


def test_a_truncated_pickle_is_an_error_naming_the_file(tmp_path):
    folder = _save_pickle_folder(tmp_path / "model", {"w": torch.ones(1000)})
    path = folder / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(CheckpointError, match="pytorch_model.bin cannot be memory-mapped"):
        open_checkpoint(folder, allow_pickle=True)


def test_sharded_pickle_checkpoints_follow_their_index(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    torch.save({"a": torch.ones(2)}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(
        CheckpointError, match="pytorch_model-00001-of-00002.bin, pytorch_model-00002-of-00002.bin"
    ):
        open_checkpoint(folder)
    checkpoint = open_checkpoint(folder, allow_pickle=True)
    assert {name: info.file.name for name, info in checkpoint.tensors.items()} == weight_map


def test_safetensors_are_preferred_when_a_folder_has_both_formats(llama):
    torch.save({"junk": torch.ones(1)}, llama / "pytorch_model.bin")
    assert open_checkpoint(llama).file_format == "safetensors"


def _one_tensor_folder(folder: Path, tensor: torch.Tensor) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"w": tensor}, folder / "model.safetensors")
    return folder


# More elements than one read of read_into's buffer (1 MiB) holds.
_LARGE = torch.randn(300_000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_read_into_converts_a_tensor_larger_than_its_read_buffer_exactly_as_torch_does(tmp_path, dtype):
    checkpoint = open_checkpoint(_one_tensor_folder(tmp_path / "model", _LARGE))
    out = torch.empty(_LARGE.shape, dtype=dtype)
    checkpoint.read_into("w", out)
    assert torch.equal(out, _LARGE.to(dtype))


def test_read_into_reads_any_range_of_elements(tmp_path):
    checkpoint = open_checkpoint(_one_tensor_folder(tmp_path / "model", _LARGE))
    out = torch.empty(1000, dtype=torch.bfloat16)
    checkpoint.read_into("w", out, start_element=262_000)
    assert torch.equal(out, _LARGE[262_000:263_000].to(torch.bfloat16))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_read_into_maps_nothing_into_the_process(tmp_path):
    folder = _one_tensor_folder(tmp_path / "model", _LARGE)
    checkpoint = open_checkpoint(folder)
    checkpoint.read_into("w", torch.empty(_LARGE.shape, dtype=torch.bfloat16))
    with open("/proc/self/maps") as maps:
        assert str(folder) not in maps.read()


def test_read_into_beyond_the_tensors_end_is_refused(tmp_path):
    checkpoint = open_checkpoint(_one_tensor_folder(tmp_path / "model", _LARGE))
    with pytest.raises(ValueError, match=r"elements 299990…300010 are outside tensor w of shape \[300000\]"):
        checkpoint.read_into("w", torch.empty(20), start_element=299_990)


def test_read_into_a_file_cut_short_after_opening_is_an_error_naming_file_and_tensor(tmp_path):
    folder = _one_tensor_folder(tmp_path / "model", _LARGE)
    checkpoint = open_checkpoint(folder)
    path = folder / "model.safetensors"
    with path.open("r+b") as stream:
        stream.truncate(path.stat().st_size - 4000)
    with pytest.raises(CheckpointError, match=r"model.safetensors ends at byte \d+, inside tensor w .*truncated"):
        checkpoint.read_into("w", torch.empty(_LARGE.shape))


def test_read_into_a_pickle_checkpoint_converts_the_range_asked_for(tmp_path):
    folder = _save_pickle_folder(tmp_path / "model", {"w": _LARGE})
    checkpoint = open_checkpoint(folder, allow_pickle=True)
    out = torch.empty(500, dtype=torch.bfloat16)
    checkpoint.read_into("w", out, start_element=100)
    assert torch.equal(out, _LARGE[100:600].to(torch.bfloat16))
