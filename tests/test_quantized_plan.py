"""Quantized models are planned at the bytes they really hold, never as dense float32.

Quantized while loading (bitsandbytes): each block's planned bytes against the model
transformers loads on the CPU with the same config. Pre-quantized folders: each block's
planned bytes against the tensors its safetensors headers list.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from header_checkpoints import awq_tensors, write_header_folder
from models import save_random_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

import devicemap
from devicemap.cli import main
from devicemap.errors import CheckpointError, DeviceMapError
from devicemap.storage.checkpoint import open_checkpoint
from devicemap.storage.safetensors_file import read_safetensors_header

BNB_CONFIGS = {
    "4bit-nf4-double": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "4bit-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "4bit-fp4-double": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
    "4bit-fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    "8bit-skipping-down_proj": BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["down_proj"]),
}  # fmt: skip
AWQ_GROUP = 32
AWQ_CONFIG = {"quant_method": "awq", "bits": 4, "group_size": AWQ_GROUP, "zero_point": True, "version": "gemm"}
CPU = {"cpu": "4GiB"}


def held_bytes(module: nn.Module) -> int:
    """Bytes ``module`` holds: parameters and buffers, with the quantization state bitsandbytes attaches."""
    total = sum(tensor.numel() * tensor.element_size() for tensor in [*module.parameters(), *module.buffers()])
    for parameter in module.parameters():
        state = getattr(parameter, "quant_state", None)
        attached = [getattr(parameter, "SCB", None)]
        if state is not None:
            attached += [state.absmax, state.code, state.offset]
            attached += [state.state2.absmax, state.state2.code] if state.state2 is not None else []
        total += sum(tensor.numel() * tensor.element_size() for tensor in attached if tensor is not None)
    return total


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory) -> Path:
    return save_random_model("llama", tmp_path_factory.mktemp("llama") / "llama", dtype=torch.bfloat16, shards=2)


@pytest.mark.parametrize("name", list(BNB_CONFIGS))
def test_bitsandbytes_plan_matches_the_loaded_model_block_by_block(llama_bf16, name):
    quantization = BNB_CONFIGS[name]
    planned = devicemap.plan(llama_bf16, "cpu", dtype=torch.bfloat16, max_memory=CPU, quantization_config=quantization)
    loaded = AutoModelForCausalLM.from_pretrained(
        llama_bf16, quantization_config=quantization, device_map="cpu", dtype=torch.bfloat16
    )
    in_memory = devicemap.plan(loaded, "cpu", max_memory=CPU).profile.blocks
    for block, loaded_block in zip(planned.profile.blocks, in_memory, strict=True):
        held = held_bytes(loaded.get_submodule(block.name))
        assert block.weight_bytes + block.buffer_bytes == pytest.approx(held, rel=0.01), block.name
        assert loaded_block.weight_bytes + loaded_block.buffer_bytes == held, block.name


def test_a_four_bit_plan_is_a_fraction_of_the_dense_one_but_keeps_embeddings_and_head_whole(llama_bf16):
    dense = devicemap.plan(llama_bf16, "cpu", dtype=torch.bfloat16, max_memory=CPU).profile.blocks
    quantized = devicemap.plan(
        llama_bf16, "cpu", dtype=torch.bfloat16, max_memory=CPU, quantization_config=BNB_CONFIGS["4bit-nf4"]
    ).profile.blocks
    by_name = {block.name: block.weight_bytes for block in dense}
    for block in quantized:
        if block.name.startswith("model.layers."):
            assert block.weight_bytes < by_name[block.name] / 3
        else:
            assert block.weight_bytes == by_name[block.name], block.name


def write_awq_folder(folder: Path) -> Path:
    """A small Llama folder stored as AWQ 4-bit GEMM stores it; the files are sparse, the headers real."""
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, dtype="float16", quantization_config=AWQ_CONFIG,
    )  # fmt: skip
    return write_header_folder(folder, config, awq_tensors(config, AWQ_GROUP), shards=2)


def header_bytes_by_block(folder: Path, block_names: list[str]) -> dict[str, int]:
    """Each header tensor's bytes, added to the block whose name prefixes the tensor's."""
    totals = dict.fromkeys(block_names, 0)
    for name, info in open_checkpoint(folder).tensors.items():
        holder = max((block for block in block_names if name.startswith(block + ".")), key=len)
        totals[holder] += info.size_bytes
    return totals


def test_a_pre_quantized_awq_folder_is_planned_from_its_headers_without_the_awq_library(tmp_path):
    folder = write_awq_folder(tmp_path / "llama-awq")
    blocks = devicemap.plan(folder, "cpu", max_memory=CPU).profile.blocks
    expected = header_bytes_by_block(folder, [block.name for block in blocks])
    assert {block.name: block.weight_bytes for block in blocks} == expected
    dense_config = LlamaConfig.from_pretrained(folder)
    del dense_config.quantization_config
    dense = devicemap.plan(dense_config, "cpu", max_memory=CPU).profile.blocks
    assert blocks[1].weight_bytes < dense[1].weight_bytes / 3


@pytest.mark.parametrize("name", list(BNB_CONFIGS))
def test_a_pre_quantized_bitsandbytes_folder_is_planned_at_its_header_bytes_and_loaded_by_that_plan(
    llama_bf16, tmp_path, name
):
    quantized = AutoModelForCausalLM.from_pretrained(
        llama_bf16, quantization_config=BNB_CONFIGS[name], device_map="cpu", dtype=torch.bfloat16
    )
    quantized.save_pretrained(folder := tmp_path / name)
    blocks = devicemap.plan(folder, "cpu", max_memory=CPU).profile.blocks
    expected = header_bytes_by_block(folder, [block.name for block in blocks])
    assert {block.name: block.weight_bytes for block in blocks} == expected
    loaded = devicemap.load(folder, device_map="cpu").devicemap_plan.profile.blocks
    assert {block.name: block.weight_bytes for block in loaded} == expected


def test_unquantized_tensors_of_a_pre_quantized_folder_load_at_the_dtype_asked(tmp_path):
    folder = write_awq_folder(tmp_path / "llama-awq")
    as_stored = {block.name: block.weight_bytes for block in devicemap.plan(folder, "cpu", max_memory=CPU).profile.blocks}
    in_float32 = {
        block.name: block.weight_bytes
        for block in devicemap.plan(folder, "cpu", dtype="float32", max_memory=CPU).profile.blocks
    }
    assert in_float32["model.embed_tokens"] == 2 * as_stored["model.embed_tokens"]
    norms = 2 * 64 * 2
    assert in_float32["model.layers.0"] == as_stored["model.layers.0"] + norms


def test_a_config_declaring_4bit_over_dense_weights_names_a_tensor(tmp_path):
    folder = save_random_model("llama", tmp_path / "llama", dtype=torch.float16, shards=1)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": AWQ_CONFIG}))
    with pytest.raises(CheckpointError, match=r"awq.*'model\.layers\.0\.self_attn\.q_proj\.weight'.*dense"):
        devicemap.plan(folder, "cpu", max_memory=CPU)


def test_a_config_only_fp8_plan_uses_the_quantizer_layout_even_on_a_machine_without_fp8_kernels():
    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, dtype="bfloat16")  # fmt: skip
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    quantized = devicemap.plan(LlamaConfig(**shape, quantization_config=fp8), "cpu", max_memory=CPU).profile.blocks
    dense = devicemap.plan(LlamaConfig(**shape), "cpu", max_memory=CPU).profile.blocks
    linear_values = 2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512
    block_scales = (2 * 2 * 2 + 2 * 2 * 1 + 3 * 2 * 4) * 4
    assert quantized[1].weight_bytes == linear_values + block_scales + 2 * 256 * 2
    assert quantized[0].weight_bytes == dense[0].weight_bytes


@pytest.mark.skipif(importlib.util.find_spec("gptqmodel") is not None, reason="the AWQ library is installed")
def test_a_config_only_awq_plan_without_its_library_names_the_pip_package(tmp_path):
    folder = write_awq_folder(tmp_path / "llama-awq")
    with pytest.raises(DeviceMapError, match=r"pip install gptqmodel.*headers"):
        devicemap.plan(folder / "config.json", "cpu", max_memory=CPU)


def test_quantizing_an_already_quantized_model_is_refused(tmp_path):
    folder = write_awq_folder(tmp_path / "llama-awq")
    with pytest.raises(DeviceMapError, match="already quantized.*awq"):
        devicemap.plan(folder, "cpu", max_memory=CPU, quantization_config=BNB_CONFIGS["8bit"])


def test_fp8_mxfp4_and_fp4_headers_are_read_at_their_stored_sizes(tmp_path):
    entries = {"fp8": ("F8_E4M3", [4, 8], 32), "scales": ("F8_E8M0", [4, 2], 8), "fp4": ("F4", [4, 16], 32),
               "blocks": ("U8", [4, 8], 32)}  # fmt: skip
    header, offset = {}, 0
    for name, (dtype, shape, size) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    path = tmp_path / "packed.safetensors"
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + bytes(offset))
    infos = read_safetensors_header(path)
    assert {name: info.size_bytes for name, info in infos.items()} == {name: e[2] for name, e in entries.items()}
    assert infos["fp4"].dtype == torch.float4_e2m1fn_x2 and infos["fp4"].shape == (4, 8)


def test_plan_quantize_4bit_on_the_command_line_prints_a_smaller_plan(demo_model, capsys):
    assert main(["plan", str(demo_model), "--max-memory", "cpu=2GiB", "--json"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert main(["plan", str(demo_model), "--max-memory", "cpu=2GiB", "--json", "--quantize", "4bit"]) == 0
    quantized = json.loads(capsys.readouterr().out)

    def weights(plan: dict) -> int:
        return sum(block["weight_bytes"] for block in plan["profile"]["blocks"])

    assert weights(quantized) < weights(dense) / 2
    embeddings = [plan["profile"]["blocks"][0] for plan in (dense, quantized)]
    assert embeddings[0]["name"] == "model.embed_tokens" and embeddings[0] == embeddings[1]
