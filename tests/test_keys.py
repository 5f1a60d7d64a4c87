import pytest
import torch
from models import random_config
from transformers import AutoModelForCausalLM, BertForMaskedLM, GPT2LMHeadModel, T5ForConditionalGeneration

from devicemap.errors import CheckpointError
from devicemap.storage.checkpoint import open_checkpoint
from devicemap.storage.keys import ShapeMismatch, check_keys, compare_keys


def _meta_model(model_class, kind: str):
    with torch.device("meta"):
        return model_class(random_config(kind))


@pytest.mark.parametrize(
    "kind, model_class",
    [
        ("llama", AutoModelForCausalLM.from_config),
        ("llama-tied", AutoModelForCausalLM.from_config),
        ("gpt2", GPT2LMHeadModel),
        ("t5", T5ForConditionalGeneration),
        ("bert", BertForMaskedLM),
    ],
)
def test_a_checkpoint_saved_from_the_same_architecture_matches(random_model_folder, kind, model_class):
    checkpoint = open_checkpoint(random_model_folder(kind))
    assert check_keys(checkpoint.shapes, _meta_model(model_class, kind)).ok


def test_a_tied_head_absent_from_the_file_is_not_missing(random_model_folder):
    shapes = open_checkpoint(random_model_folder("llama-tied")).shapes
    assert "lm_head.weight" not in shapes
    assert compare_keys(shapes, _meta_model(AutoModelForCausalLM.from_config, "llama-tied")).missing == ()


def test_an_untied_head_absent_from_the_file_is_missing(random_model_folder):
    shapes = open_checkpoint(random_model_folder("llama")).shapes
    del shapes["lm_head.weight"]
    report = compare_keys(shapes, _meta_model(AutoModelForCausalLM.from_config, "llama"))
    assert report.missing == ("lm_head.weight",)


def test_t5_needs_only_one_of_its_shared_embeddings(random_model_folder):
    shapes = open_checkpoint(random_model_folder("t5")).shapes
    kept = {name: shape for name, shape in shapes.items() if not name.endswith("embed_tokens.weight")}
    assert compare_keys(kept, _meta_model(T5ForConditionalGeneration, "t5")).ok


def test_non_persistent_buffers_and_declared_ignorable_keys_in_a_checkpoint_are_tolerated(
    random_model_folder,
):
    shapes = open_checkpoint(random_model_folder("bert")).shapes
    shapes["bert.embeddings.position_ids"] = (1, 256)
    assert compare_keys(shapes, _meta_model(BertForMaskedLM, "bert")).ok
    shapes = open_checkpoint(random_model_folder("gpt2")).shapes
    shapes["transformer.h.0.attn.bias"] = (1, 1, 256, 256)
    assert compare_keys(shapes, _meta_model(GPT2LMHeadModel, "gpt2")).ok


def test_missing_unexpected_and_reshaped_tensors_are_all_reported(random_model_folder):
    shapes = open_checkpoint(random_model_folder("llama")).shapes
    del shapes["model.layers.2.mlp.up_proj.weight"]
    shapes["model.layers.9.mlp.up_proj.weight"] = (128, 64)
    shapes["model.embed_tokens.weight"] = (1000, 64)
    report = compare_keys(shapes, _meta_model(AutoModelForCausalLM.from_config, "llama"))
    assert report.missing == ("model.layers.2.mlp.up_proj.weight",)
    assert report.unexpected == ("model.layers.9.mlp.up_proj.weight",)
    assert report.mismatched == (ShapeMismatch("model.embed_tokens.weight", (512, 64), (1000, 64)),)
    assert not report.ok


def test_check_keys_raises_one_error_listing_every_problem(random_model_folder):
    shapes = open_checkpoint(random_model_folder("llama")).shapes
    del shapes["model.norm.weight"]
    shapes["extra.weight"] = (1,)
    shapes["lm_head.weight"] = (512, 32)
    with pytest.raises(CheckpointError) as error:
        check_keys(shapes, _meta_model(AutoModelForCausalLM.from_config, "llama"), source="folder /m")
    message = str(error.value)
    assert message.startswith("folder /m does not match LlamaForCausalLM:")
    assert "1 missing (the model has them, the checkpoint does not): model.norm.weight" in message
    assert "1 unexpected (the checkpoint has them, the model does not): extra.weight" in message
    assert "1 with another shape: lm_head.weight expects [512, 64], checkpoint has [512, 32]" in message
    assert "Check that config.json describes these weights" in message


def test_a_long_list_of_problems_is_cut_with_a_count_of_the_rest(random_model_folder):
    shapes = {f"stray.{i:02d}": (1,) for i in range(25)} | open_checkpoint(
        random_model_folder("llama")
    ).shapes
    with pytest.raises(CheckpointError) as error:
        check_keys(shapes, _meta_model(AutoModelForCausalLM.from_config, "llama"))
    assert "25 unexpected" in str(error.value)
    assert "stray.09 … and 15 more" in str(error.value)
    assert "stray.10" not in str(error.value)
