"""Quantized loading: bitsandbytes 4-bit and 8-bit made while loading, in memory and on disk, as transformers does."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

import devicemap
from devicemap.errors import DeviceMapError
from devicemap.runtime.paging import file_backed, page_ranges

pytest.importorskip("bitsandbytes")

PROMPT = torch.tensor([[1, 5, 9, 14, 3]])
QUANTIZATIONS = {
    "4bit": {"load_in_4bit": True},
    "4bit-nested-nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "8bit": {"load_in_8bit": True},
}
HALF_ON_DISK = {"": "cpu", "model.layers.2": "disk", "model.layers.3": "disk"}


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


def test_pre_quantized_bitsandbytes_folders_are_refused_with_what_to_do_instead(llama_folder, tmp_path):
    folder = _save_declaring(llama_folder, tmp_path, {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(DeviceMapError, match="pre-quantized bitsandbytes .* quantization_config=BitsAndBytesConfig"):
        devicemap.load(folder, device_map="cpu")


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
