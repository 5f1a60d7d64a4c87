"""Generation across devices is exact: the same tokens as the model loaded plainly on one device.

Every placement below computes on the CPU (the only device CI has), with weights in
memory, memory-mapped from the checkpoint, or converted into devicemap's offload files;
the reference is transformers' own ``from_pretrained`` of the same folder and dtype.
"""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

import devicemap
from devicemap.planning.planner import STRATEGIES
from devicemap.runtime.load import load
from devicemap.workload import Workload

NEW_TOKENS = 8
WORKLOAD = Workload(batch_size=1, max_tokens=64)


def prompt(vocab_size: int = 512, length: int = 6) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab_size, (1, length), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def greedy(model, inputs: dict, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)


def plain_tokens(folder: Path, dtype: torch.dtype, auto_class=AutoModelForCausalLM, new_tokens=NEW_TOKENS):
    reference = auto_class.from_pretrained(folder, dtype=dtype)
    return greedy(reference, prompt(reference.config.vocab_size), new_tokens)


def layer_blocks(folder: Path) -> list[str]:
    """The model's repeated blocks (names ending in a layer number), in execution order."""
    blocks = devicemap.plan(folder, "cpu", workload=WORKLOAD).profile.blocks
    return [block.name for block in blocks if re.search(r"\.\d+$", block.name)]


def map_layers(folder: Path, layers: list[str], device: str) -> dict[str, str]:
    """Every block on the CPU except ``layers``, which go to ``device``."""
    blocks = devicemap.plan(folder, "cpu", workload=WORKLOAD).profile.blocks
    return {block.name: device if block.name in layers else "cpu" for block in blocks}


def devices_used(model) -> set[str]:
    return {placement.device for placement in model.devicemap_plan.placements}


@pytest.fixture(scope="module")
def llama(random_model_folder) -> Path:
    return random_model_folder("llama")


@pytest.fixture(scope="module")
def llama_tokens(llama) -> torch.Tensor:
    return plain_tokens(llama, torch.float32)


def test_all_on_cpu_generates_the_plain_models_tokens(llama, llama_tokens):
    model = load(llama, device_map="cpu")
    assert devices_used(model) == {"cpu"}
    assert torch.equal(greedy(model, prompt()), llama_tokens)


def test_half_the_layers_on_disk_generates_the_plain_models_tokens(llama, llama_tokens, tmp_path):
    layers = layer_blocks(llama)
    model = load(llama, device_map=map_layers(llama, layers[len(layers) // 2 :], "disk"), offload_folder=tmp_path)
    assert devices_used(model) == {"cpu", "disk"}
    assert torch.equal(greedy(model, prompt()), llama_tokens)


def test_all_layers_on_disk_computing_on_cpu_generates_the_plain_models_tokens(llama, llama_tokens, tmp_path):
    model = load(llama, device_map=map_layers(llama, layer_blocks(llama), "disk"), offload_folder=tmp_path)
    assert {p.execution_device for p in model.devicemap_plan.placements if p.device == "disk"} == {"cpu"}
    assert torch.equal(greedy(model, prompt()), llama_tokens)


def test_a_manual_map_of_prefixes_generates_the_plain_models_tokens(llama, llama_tokens, tmp_path):
    manual = {"model": "cpu", "model.layers.1": "disk", "model.layers.4": "disk", "lm_head": "disk"}
    model = load(llama, device_map=manual, offload_folder=tmp_path)
    assert model.devicemap_plan.strategy == "manual"
    assert torch.equal(greedy(model, prompt()), llama_tokens)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_that_must_offload_generates_the_plain_models_tokens(
    strategy, llama, llama_tokens, tmp_path
):
    everything = devicemap.plan(llama, "cpu", workload=WORKLOAD).ledger
    cpu = next(row for row in everything if row.device == "cpu")
    budget = cpu.used_bytes - cpu.weight_bytes // 2
    model = load(llama, device_map=strategy, max_memory={"cpu": budget}, workload=WORKLOAD, offload_folder=tmp_path)
    assert "disk" in devices_used(model)
    assert torch.equal(greedy(model, prompt()), llama_tokens)


def test_the_demo_model_in_float32_with_every_layer_on_disk_generates_its_plain_tokens(demo_model, tmp_path):
    every_layer_on_disk = map_layers(demo_model, layer_blocks(demo_model), "disk")
    model = load(demo_model, device_map=every_layer_on_disk, offload_folder=tmp_path)
    expected = plain_tokens(demo_model, torch.float32)
    assert torch.equal(greedy(model, prompt(49152)), expected)
    assert not any(tmp_path.iterdir()), "float32 weights are mapped from the checkpoint, not written"


def test_the_demo_model_in_bfloat16_with_half_its_layers_on_disk_generates_its_plain_tokens(demo_model, tmp_path):
    layers = layer_blocks(demo_model)
    model = load(
        demo_model, device_map=map_layers(demo_model, layers[15:], "disk"), dtype=torch.bfloat16,
        offload_folder=tmp_path,
    )  # fmt: skip
    assert model.model.layers[29].mlp.up_proj.weight.dtype == torch.bfloat16
    expected = plain_tokens(demo_model, torch.bfloat16)
    assert torch.equal(greedy(model, prompt(49152)), expected)


@pytest.mark.parametrize("kind", ["qwen3-moe", "gpt2", "llama-tied"])
def test_a_decoder_with_half_its_layers_on_disk_generates_its_plain_tokens(kind, random_model_folder, tmp_path):
    folder = random_model_folder(kind)
    layers = layer_blocks(folder)
    model = load(folder, device_map=map_layers(folder, layers[len(layers) // 2 :], "disk"), offload_folder=tmp_path)
    assert torch.equal(greedy(model, prompt()), plain_tokens(folder, torch.float32))


def test_a_mixture_of_experts_converted_to_bfloat16_on_disk_generates_its_plain_tokens(random_model_folder, tmp_path):
    folder = random_model_folder("qwen3-moe")
    model = load(
        folder, device_map=map_layers(folder, layer_blocks(folder), "disk"), dtype=torch.bfloat16,
        offload_folder=tmp_path,
    )  # fmt: skip
    assert torch.equal(greedy(model, prompt()), plain_tokens(folder, torch.bfloat16))


def test_an_encoder_decoder_with_blocks_on_disk_generates_its_plain_tokens(random_model_folder, tmp_path):
    folder = random_model_folder("t5")
    layers = layer_blocks(folder)
    model = load(folder, device_map=map_layers(folder, layers[1::2], "disk"), offload_folder=tmp_path)
    assert {"encoder", "decoder"} <= {layer.split(".")[0] for layer in layers[1::2]}
    assert torch.equal(greedy(model, prompt()), plain_tokens(folder, torch.float32, AutoModelForSeq2SeqLM))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_encoders_logits_equal_the_plain_models_within_dtype_tolerance(dtype, random_model_folder, tmp_path):
    folder = random_model_folder("bert")
    layers = layer_blocks(folder)
    model = load(folder, device_map=map_layers(folder, layers[::2], "disk"), dtype=dtype, offload_folder=tmp_path)
    reference = AutoModelForMaskedLM.from_pretrained(folder, dtype=dtype)
    inputs = prompt()
    with torch.inference_mode():
        logits, expected = model(**inputs).logits, reference(**inputs).logits
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(logits, expected, rtol=tolerance, atol=tolerance)
