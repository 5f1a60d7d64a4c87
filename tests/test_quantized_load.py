"""Quantized loading: bitsandbytes 4-bit and 8-bit, made while loading or read from a pre-quantized folder, in
memory and on disk, as transformers does; a config that contradicts the stored tensors is refused naming one."""

import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_load import assert_nothing_left
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import devicemap
from devicemap.cli import main
from devicemap.errors import CheckpointError, DeviceMapError
from devicemap.runtime.paging import file_backed, page_ranges
from devicemap.runtime.prompts import tokenize

pytest.importorskip("bitsandbytes")

PROMPT = torch.tensor([[1, 5, 9, 14, 3]])
QUANTIZATIONS = {
    "4bit": {"load_in_4bit": True},
    "4bit-nested-nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "8bit": {"load_in_8bit": True},
}
HALF_ON_DISK = {"": "cpu", "model.layers.2": "disk", "model.layers.3": "disk"}
# What transformers' save_pretrained writes for a model it loaded quantized.
PRE_QUANTIZED = {
    "4bit-nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "4bit-nf4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "4bit-fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "4bit-fp4-double": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "8bit": {"load_in_8bit": True},
}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A four-layer Llama whose linear layers are wide enough for bitsandbytes' 64-value blocks."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("llama-for-bitsandbytes")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pre_quantized(llama_folder, tmp_path_factory) -> Callable[[str], Path]:
    """A function giving ``llama_folder`` as transformers saves it quantized as ``PRE_QUANTIZED[name]`` says."""
    folders: dict[str, Path] = {}

    def folder_of(name: str) -> Path:
        if name not in folders:
            config = BitsAndBytesConfig(**PRE_QUANTIZED[name])
            model = AutoModelForCausalLM.from_pretrained(llama_folder, quantization_config=config, device_map="cpu")
            folders[name] = tmp_path_factory.mktemp(f"llama-{name}")
            model.save_pretrained(folders[name])
        return folders[name]

    return folder_of


def _generate(model) -> torch.Tensor:
    return model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("name", QUANTIZATIONS)
def test_quantized_load_with_layers_on_disk_generates_transformers_tokens(llama_folder, tmp_path, name):
    config = BitsAndBytesConfig(**QUANTIZATIONS[name])
    reference = AutoModelForCausalLM.from_pretrained(llama_folder, quantization_config=config, device_map="cpu")
    model = devicemap.load(llama_folder, device_map=HALF_ON_DISK, quantization_config=config, offload_folder=tmp_path)
    assert torch.equal(_generate(model), _generate(reference))


@pytest.mark.parametrize("name", ["4bit", "8bit"])
def test_disk_blocks_hold_packed_bytes_mapped_from_offload_files(llama_folder, tmp_path, name):
    config = BitsAndBytesConfig(**QUANTIZATIONS[name])
    model = devicemap.load(llama_folder, device_map=HALF_ON_DISK, quantization_config=config, offload_folder=tmp_path)
    on_disk = model.model.layers[3].mlp.down_proj.weight
    in_memory = model.model.layers[0].mlp.down_proj.weight
    assert type(on_disk).__name__ == ("Params4bit" if name == "4bit" else "Int8Params")
    assert on_disk.dtype == (torch.uint8 if name == "4bit" else torch.int8)
    assert file_backed(page_ranges([on_disk])) and not file_backed(page_ranges([in_memory]))
    dense_bytes = 128 * 256 * 4
    packed_bytes = on_disk.numel() * on_disk.element_size()
    assert packed_bytes == dense_bytes // (8 if name == "4bit" else 4), "a quarter (4-bit) or half (8-bit) of bf16's"
    layer_values = 2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128
    written = sum(path.stat().st_size for path in tmp_path.rglob("*.safetensors"))
    assert written < 2 * layer_values * 1.1, "two layers went to disk, at most a byte a value with their scales"


def test_quantized_plan_places_the_quantized_sizes(llama_folder):
    model = devicemap.load(llama_folder, device_map="cpu", quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    planned = devicemap.plan(llama_folder, "cpu", quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    assert model.devicemap_plan.profile.blocks == planned.profile.blocks


def _save_declaring(folder: Path, tmp_path: Path, quantization: dict) -> Path:
    target = tmp_path / "declared"
    target.mkdir()
    for path in folder.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = quantization
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
@pytest.mark.parametrize("method", ["gptq", "awq", "fp8", "mxfp4", "compressed-tensors"])
def test_formats_whose_kernels_need_a_gpu_are_refused_by_name(llama_folder, tmp_path, method):
    folder = _save_declaring(llama_folder, tmp_path, {"quant_method": method, "bits": 4})
    with pytest.raises(DeviceMapError, match=f"stored quantized as {method}; its kernels need a GPU"):
        devicemap.load(folder, device_map="cpu")


def test_quantizing_an_already_quantized_checkpoint_is_refused(llama_folder, tmp_path):
    folder = _save_declaring(llama_folder, tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(DeviceMapError, match="bitsandbytes"):
        devicemap.load(folder, device_map="cpu", quantization_config=BitsAndBytesConfig(load_in_8bit=True))


@pytest.mark.parametrize("name", PRE_QUANTIZED)
def test_a_pre_quantized_folder_with_half_its_layers_on_disk_generates_transformers_tokens(pre_quantized, tmp_path, name):
    folder = pre_quantized(name)
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    model = devicemap.load(folder, device_map=HALF_ON_DISK, offload_folder=tmp_path)
    assert torch.equal(_generate(model), _generate(reference))
    on_disk = model.model.layers[3].mlp.down_proj.weight
    assert type(on_disk) is type(reference.model.layers[3].mlp.down_proj.weight)
    assert file_backed(page_ranges([on_disk])), "a disk block computes on the file's bytes"
    assert list(tmp_path.iterdir()) == [], "the checkpoint holds the packed bytes as they compute: nothing is written"


def test_a_pre_quantized_folder_is_planned_and_checked_without_bitsandbytes(pre_quantized, tmp_path):
    folder = pre_quantized("4bit-nf4-double")
    contradicting = _copy_changed(
        folder, tmp_path / "fp4-declared", lambda config: config["quantization_config"].update(bnb_4bit_quant_type="fp4")
    )
    script = textwrap.dedent(
        """
        import sys
        sys.modules["bitsandbytes"] = None
        import devicemap
        print(sum(block.weight_bytes for block in devicemap.plan(sys.argv[1], "cpu").profile.blocks))
        devicemap.plan(sys.argv[2], "cpu")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(folder), str(contradicting)], check=False, capture_output=True, text=True
    )
    assert int(result.stdout) == sum(block.weight_bytes for block in devicemap.plan(folder, "cpu").profile.blocks)
    assert "CheckpointError: config.json declares bitsandbytes 4-bit fp4 with double quantization" in result.stderr


def test_the_command_line_generates_from_a_pre_quantized_folder_as_transformers_does(demo_model, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    quantization = BitsAndBytesConfig(**PRE_QUANTIZED["4bit-nf4-double"])
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization)
    quantized.save_pretrained(folder := tmp_path / "quantized")
    tokenizer.save_pretrained(folder)
    (device_map := tmp_path / "device_map.json").write_text(json.dumps({"": "cpu", "model.layers.1": "disk"}))
    code = main(["generate", str(folder), "Hello", "--json", "--max-new-tokens", "4", "--device-map", str(device_map)])
    [generation] = json.loads(capsys.readouterr().out)
    reference = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    inputs = tokenize(tokenizer, ["Hello"], False, None)
    expected = reference.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert code == 0
    assert generation["text"] == tokenizer.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_config_declaring_bitsandbytes_over_dense_weights_names_a_tensor(llama_folder, tmp_path, offload):  # noqa: F811
    folder = _save_declaring(llama_folder, tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(CheckpointError, match=r"declares bitsandbytes 4-bit .* every weight dense: tensor 'model\."):
        devicemap.load(folder, device_map="cpu", offload_folder=offload)
    assert_nothing_left(offload, folder)


def _copy_changed(folder: Path, target: Path, config_change=None, tensors_change=None) -> Path:
    """A copy of ``folder`` whose config.json (a dict) and tensors (a dict) ``*_change`` alter in place."""
    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    if config_change is not None:
        config_change(config)
    (target / "config.json").write_text(json.dumps(config))
    if tensors_change is not None:
        tensors = load_file(target / "model.safetensors")
        tensors_change(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target


def _densify(dense_folder: Path, weight: str):
    """A change to a checkpoint's tensors: ``weight`` stored dense, as ``dense_folder`` holds it, without its state."""

    def change(tensors: dict) -> None:
        for name in [name for name in tensors if name.startswith(weight)]:
            del tensors[name]
        tensors[weight] = load_file(dense_folder / "model.safetensors")[weight]

    return change


CONTRADICTIONS = {
    "8-bit asked of a 4-bit folder": (
        "4bit-nf4", {}, BitsAndBytesConfig(load_in_8bit=True),
        r"quantization_config asks to quantize the weights while loading \(bitsandbytes 8-bit\).*"
        r"'model\.layers\.0\.self_attn\.q_proj\.weight' as float \[128, 128\].*as uint8 \[8192, 1\] beside "
        r"'.*bitsandbytes__nf4'; config\.json declares bitsandbytes 4-bit nf4: drop quantization_config",
    ),
    "4-bit asked of packed weights whose config.json says nothing": (
        "4bit-nf4", {"config_change": lambda config: config.pop("quantization_config")},
        BitsAndBytesConfig(load_in_4bit=True),
        r"'model\.layers\.0\.self_attn\.q_proj\.weight' as float \[128, 128\].*already quantized, as uint8 "
        r"\[8192, 1\].*config\.json declares no quantization: put back the quantization_config",
    ),
    "nf4 declared over fp4 tensors": (
        "4bit-fp4", {"config_change": lambda config: config["quantization_config"].update(bnb_4bit_quant_type="nf4")},
        None,
        r"declares bitsandbytes 4-bit nf4, which stores 'model\.layers\.0\.self_attn\.q_proj\.weight' as uint8 "
        r"\[8192, 1\] beside '.*bitsandbytes__nf4'; but the checkpoint holds it as uint8 \[8192, 1\] beside "
        r"'.*bitsandbytes__fp4'",
    ),
    "4-bit declared over a layer stored dense": (
        "4bit-nf4-double", {"tensors_change": "model.layers.1.mlp.down_proj.weight"}, None,
        r"which stores 'model\.layers\.1\.mlp\.down_proj\.weight' as uint8 \[16384, 1\].*holds it as float32 "
        r"\[128, 256\], with no quantization state beside it.*llm_int8_skip_modules",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", CONTRADICTIONS)
def test_a_quantization_config_contradicting_the_stored_tensors_is_refused_naming_one_before_loading(
    pre_quantized, llama_folder, tmp_path, offload, case  # noqa: F811
):
    name, changes, asked, message = CONTRADICTIONS[case]
    if "tensors_change" in changes:
        changes = {"tensors_change": _densify(llama_folder, changes["tensors_change"])}
    folder = _copy_changed(pre_quantized(name), tmp_path / "contradicting", **changes)
    with pytest.raises(CheckpointError, match=message):
        devicemap.plan(folder, "cpu", max_memory={"cpu": "1GiB"}, quantization_config=asked)
    with pytest.raises(CheckpointError, match=message):
        devicemap.load(folder, device_map=HALF_ON_DISK, offload_folder=offload, quantization_config=asked)
    assert_nothing_left(offload, folder)


BLOCKED_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules[sys.argv[1]] = None  # an import of it now fails, as if it were not installed
    import torch
    from transformers import BitsAndBytesConfig
    import devicemap
    folder, offload, quantize = sys.argv[2], sys.argv[3], sys.argv[4] == "4bit"
    config = BitsAndBytesConfig(load_in_4bit=True) if quantize else None
    device_map = {"": "cpu", "model.layers.2": "disk", "model.layers.3": "disk"}
    model = devicemap.load(folder, device_map=device_map, offload_folder=offload, quantization_config=config,
                           dtype=torch.bfloat16)
    prompt = torch.tensor([[1, 5, 9, 14, 3]])
    print(model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False).tolist())
    assert "accelerate" not in sys.modules or sys.modules["accelerate"] is None
    """
)


@pytest.mark.parametrize("quantize", ["dense", "4bit"])
def test_loads_and_generates_without_accelerate(llama_folder, tmp_path, quantize):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_SCRIPT, "accelerate", str(llama_folder), str(tmp_path), quantize],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(json.loads(result.stdout.splitlines()[-1])[0]) == 9


def test_a_missing_quantization_library_names_the_pip_package(llama_folder, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BLOCKED_SCRIPT, "bitsandbytes", str(llama_folder), str(tmp_path), "4bit"],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "pip install bitsandbytes" in result.stderr
