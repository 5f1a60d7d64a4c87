"""Loading: every tensor straight to where the plan keeps it, disk without copies, and clean failures."""

import gc
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models import build_random_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, LlamaConfig, LlamaForCausalLM

import devicemap
from devicemap.errors import CheckpointError, DeviceMapError, DeviceNotFoundError
from devicemap.runtime.load import load
from devicemap.storage.shards import write_sharded

LAYERS_ON_DISK = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip


@pytest.fixture
def llama(random_model_folder, tmp_path) -> Path:
    """A private copy of a 3-shard float32 Llama folder that a test may damage."""
    return Path(shutil.copytree(random_model_folder("llama"), tmp_path / "llama"))


def mappings_of(folder: Path) -> int:
    """How many memory mappings of files under ``folder`` this process holds."""
    with open("/proc/self/maps") as maps:
        return sum(str(folder) in line for line in maps)


def assert_nothing_left(offload: Path, checkpoint: Path) -> None:
    gc.collect()
    assert sorted(path.name for path in offload.iterdir()) == ["theirs.txt"]
    assert (offload / "theirs.txt").read_text() == "kept"
    if sys.platform.startswith("linux"):
        assert mappings_of(checkpoint) == 0, "a failed load holds no view of the checkpoint"


def disk_parameters(model) -> list[torch.nn.Parameter]:
    return [p for layer in model.model.layers for p in layer.parameters()]


def test_disk_blocks_at_the_checkpoints_dtype_are_views_of_its_files_and_nothing_is_written(llama, offload):
    model = load(llama, device_map=LAYERS_ON_DISK, offload_folder=offload)
    shard_bytes = {path.stat().st_size for path in llama.glob("*.safetensors")}
    assert all(p.untyped_storage().nbytes() in shard_bytes for p in disk_parameters(model))
    assert sorted(path.name for path in offload.iterdir()) == ["theirs.txt"]


def test_converting_disk_blocks_writes_safetensors_into_a_folder_of_its_own_removed_with_the_model(llama, offload):
    model = load(llama, device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=offload)
    (ours,) = [path for path in offload.iterdir() if path.name != "theirs.txt"]
    assert ours.name.startswith("devicemap-")
    files = sorted(ours.glob("*.safetensors"))
    assert len(files) == 6
    weight = model.model.layers[0].mlp.down_proj.weight
    with safe_open(str(files[0]), framework="pt") as written:
        assert torch.equal(written.get_tensor("model.layers.0.mlp.down_proj.weight"), weight)
    original = load_file(next(llama.glob("*00001*.safetensors")))["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(weight, original.to(torch.bfloat16))
    del model, weight
    gc.collect()
    assert sorted(path.name for path in offload.iterdir()) == ["theirs.txt"]


def test_cpu_blocks_at_the_checkpoints_dtype_are_views_of_its_files(llama):
    model = load(llama, device_map="cpu")
    shard_bytes = {path.stat().st_size for path in llama.glob("*.safetensors")}
    assert all(p.untyped_storage().nbytes() in shard_bytes for p in model.parameters())


@pytest.mark.parametrize("kind, embedding", [("llama-tied", "model.embed_tokens"), ("gpt2", "transformer.wte")])
@pytest.mark.parametrize("device", ["cpu", "disk"])
def test_tied_weights_are_loaded_once_and_stay_one_tensor(kind, embedding, device, random_model_folder, tmp_path):
    folder = random_model_folder(kind)
    tied = {embedding: device, "lm_head": device, embedding.split(".")[0]: "cpu"}
    model = load(folder, device_map=tied, dtype=torch.bfloat16, offload_folder=tmp_path)
    assert model.lm_head.weight is model.get_submodule(embedding).weight
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_buffers_the_checkpoint_lacks_equal_a_plain_loads(random_model_folder, tmp_path):
    folder = random_model_folder("llama")
    model = load(folder, device_map=LAYERS_ON_DISK, offload_folder=tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model.model.rotary_emb.inv_freq, plain.model.rotary_emb.inv_freq)
    bert = load(random_model_folder("bert"), device_map="cpu")
    plain_bert = AutoModelForMaskedLM.from_pretrained(random_model_folder("bert"))
    for name, buffer in plain_bert.named_buffers():
        assert torch.equal(bert.get_buffer(name), buffer), name


def test_the_model_comes_back_in_eval_mode_with_its_device_map_and_plan(random_model_folder):
    folder = random_model_folder("llama", torch.bfloat16)
    model = load(folder, device_map="cpu")
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.hf_device_map == model.devicemap_plan.device_map == {"": "cpu"}
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16, "the checkpoint's dtype by default"


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A float32 Llama whose large tensors span several of the loader's read buffers and pieces."""
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=1100, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    folder = tmp_path_factory.mktemp("wide-llama")
    write_sharded(folder, LlamaForCausalLM(config).state_dict(), shard_count=2)
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("device_map", ["cpu", LAYERS_ON_DISK])
def test_a_converting_load_holds_exactly_each_checkpoint_tensor_converted_by_torch(wide_llama, device_map, tmp_path):
    model = load(wide_llama, device_map=device_map, dtype=torch.bfloat16, offload_folder=tmp_path)
    expected = {}
    for path in wide_llama.glob("*.safetensors"):
        expected.update(load_file(path))
    loaded = model.state_dict()
    assert max(tensor.numel() for tensor in expected.values()) > 2**18
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.bfloat16, name
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name


def test_a_converting_load_leaves_the_callers_torch_thread_count_as_it_was(wide_llama, tmp_path):
    # Loading threads run their copies on one torch thread each; that setting is theirs alone.
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    try:
        load(wide_llama, device_map="cpu", dtype=torch.bfloat16)
        assert torch.get_num_threads() == max(2, before)
    finally:
        torch.set_num_threads(before)


def test_a_plan_is_loaded_as_it_is(random_model_folder, tmp_path):
    folder = random_model_folder("llama")
    plan = devicemap.plan(folder, LAYERS_ON_DISK)
    model = load(folder, device_map=plan, offload_folder=tmp_path)
    assert model.devicemap_plan is plan


def test_a_mixture_of_experts_fuses_its_experts_as_transformers_does(random_model_folder):
    folder = random_model_folder("qwen3-moe")
    model = load(folder, device_map="cpu")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


PEAK_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys, torch
    from devicemap.runtime.load import load

    def peak_growth(**arguments):
        gc.collect()
        with open("/proc/self/status") as status:
            before = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak resident size to the current one
        model = load(sys.argv[1], **arguments)
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
        del model
        return (peak - before) * 1024

    disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
            "model.rotary_emb": "cpu", "lm_head": "cpu"}
    load(sys.argv[1], device_map="cpu", offload_folder=sys.argv[2])  # imports and first-use costs
    print(json.dumps({
        "mapped": peak_growth(device_map="cpu"),
        "converted": peak_growth(device_map="cpu", dtype=torch.bfloat16),
        "disk": peak_growth(device_map=disk, dtype=torch.bfloat16, offload_folder=sys.argv[2]),
    }))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS in /proc")
def test_peak_host_memory_during_a_load_stays_near_the_cpu_resident_weights(tmp_path):
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config)
    folder = tmp_path / "model"
    folder.mkdir()
    write_sharded(folder, model.state_dict(), shard_count=2)
    config.save_pretrained(folder)
    total_bytes = sum(p.nbytes for p in model.parameters())
    largest_bytes = max(p.nbytes for p in model.parameters())
    layer_bytes = sum(p.nbytes for p in model.model.layers.parameters())
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(folder), str(tmp_path / "offload")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    growth = json.loads(result.stdout.splitlines()[-1])
    slack = 8 * 2**20
    assert growth["mapped"] < slack, "weights at the checkpoint's dtype are mapped, not read"
    assert growth["converted"] < total_bytes // 2 + largest_bytes + slack, "bfloat16 copies plus one tensor"
    assert growth["disk"] < (total_bytes - layer_bytes) // 2 + largest_bytes + slack, "disk layers are not kept"


# Bad input: a clear error naming what is wrong, and nothing left behind.


def test_a_missing_folder_is_an_error_naming_it(tmp_path, offload):
    with pytest.raises(CheckpointError, match=r"model folder .*nowhere does not exist"):
        load(tmp_path / "nowhere", offload_folder=offload)
    assert_nothing_left(offload, tmp_path / "nowhere")


def test_a_folder_without_config_is_an_error(llama, offload):
    (llama / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        load(llama, offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_a_shard_named_in_the_index_but_absent_is_an_error_naming_it(llama, offload):
    (llama / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"not there: model-00002-of-00003.safetensors \(\d+ tensors\)"):
        load(llama, device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_a_truncated_safetensors_file_is_an_error(llama, offload):
    shard = llama / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    truncated = r"model-00003-of-00003.safetensors is corrupt or truncated.*1000 missing"
    with pytest.raises(CheckpointError, match=truncated):
        load(llama, device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_a_corrupt_safetensors_header_is_an_error(llama, offload):
    shard = llama / "model-00001-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"garbage!"
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        load(llama, offload_folder=offload)
    assert_nothing_left(offload, llama)


def _rewrite_shard(folder: Path, shard: str, change) -> None:
    tensors = load_file(folder / shard)
    change(tensors)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    if not index_path.exists():
        return
    index = json.loads(index_path.read_text())
    others = {name: file for name, file in index["weight_map"].items() if file != shard}
    index["weight_map"] = {**others, **dict.fromkeys(tensors, shard)}
    index_path.write_text(json.dumps(index))


def test_keys_missing_from_the_checkpoint_are_listed(llama, offload):
    _rewrite_shard(llama, "model-00002-of-00003.safetensors", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing \(.*\): model.layers.2.mlp.up_proj.weight"):
        load(llama, offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_keys_the_model_does_not_have_are_listed(llama, offload):
    _rewrite_shard(llama, "model-00003-of-00003.safetensors", lambda t: t.update({"model.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"1 unexpected \(.*\): model.extra.weight"):
        load(llama, offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(llama, offload):
    config = json.loads((llama / "config.json").read_text())
    config["intermediate_size"] = 96
    (llama / "config.json").write_text(json.dumps(config))
    mismatch = r"model.layers.0.mlp.down_proj.weight expects \[64, 96\], checkpoint has \[64, 128\]"
    with pytest.raises(CheckpointError, match=mismatch):
        load(llama, offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_a_mismatch_found_while_writing_disk_blocks_leaves_no_half_written_folder(
    random_model_folder, tmp_path, offload
):
    folder = Path(shutil.copytree(random_model_folder("qwen3-moe", shards=1), tmp_path / "moe"))
    bad = "model.layers.3.mlp.experts.2.up_proj.weight"
    _rewrite_shard(folder, "model.safetensors", lambda t: t.update({bad: torch.zeros(16, 64)}))
    fused = r"model.layers.3.mlp.experts.gate_up_proj is built from 8 checkpoint tensors"
    with pytest.raises(CheckpointError, match=fused):
        load(folder, device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=offload)
    assert_nothing_left(offload, folder)


def test_an_offload_folder_that_did_not_exist_is_removed_after_a_failure(random_model_folder, tmp_path):
    folder = Path(shutil.copytree(random_model_folder("qwen3-moe", shards=1), tmp_path / "moe"))
    bad = "model.layers.3.mlp.experts.2.up_proj.weight"
    _rewrite_shard(folder, "model.safetensors", lambda t: t.update({bad: torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError):
        load(folder, device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=tmp_path / "new" / "offload")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "arguments",
    [
        {"max_memory": {"cuda:0": "1GB", "cpu": "1GB"}},
        {"device_map": {"model": "cuda:0", "lm_head": "cpu"}},
    ],
)
def test_a_device_this_machine_lacks_is_an_error_naming_it(arguments, llama, offload):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceNotFoundError, match="cuda:0"):
        load(llama, offload_folder=offload, **arguments)
    assert_nothing_left(offload, llama)


def test_a_single_device_this_machine_lacks_is_an_error(llama, offload):
    with pytest.raises(DeviceMapError, match="cuda:7"):
        load(llama, device_map="cuda:7", offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_a_plan_for_devices_this_machine_lacks_is_an_error(llama, offload):
    plan = devicemap.plan(llama, "auto", max_memory={"cuda:7": "1GB", "cpu": "1GB"})
    with pytest.raises(DeviceNotFoundError, match="cuda:7"):
        load(llama, device_map=plan, offload_folder=offload)
    assert_nothing_left(offload, llama)


def test_a_pickle_checkpoint_is_refused_unless_allowed_and_then_read_safely(tmp_path, offload):
    folder = tmp_path / "pickled"
    folder.mkdir()
    model = build_random_model("llama")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load(folder, offload_folder=offload)
    assert_nothing_left(offload, folder)
    loaded = load(folder, device_map="cpu", allow_pickle=True)
    ids = torch.tensor([[5, 17, 42]])
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_model_shipping_its_own_code_is_refused_without_trust_remote_code(llama, offload):
    marker = llama / "code-ran"
    (llama / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((llama / "config.json").read_text())
    config.update(model_type="custom-thing", auto_map={"AutoConfig": "custom.CustomConfig"}, architectures=["Custom"])
    (llama / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="trust_remote_code=True"):
        load(llama, offload_folder=offload)
    assert not marker.exists()
    assert_nothing_left(offload, llama)
