import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from devicemap.cli import main
from devicemap.planning.plan import Plan
from devicemap.runtime.prompts import tokenize

LLAMA_3_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def llama_70b_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(LLAMA_3_70B))
    return path


def test_plan_prints_a_ledger_for_hypothetical_gpus(llama_70b_config, capsys):
    code = main(["plan", str(llama_70b_config), "--max-memory", ",".join(f"{i}=80GiB" for i in range(8)),
                 "--strategy", "auto", "--dtype", "bfloat16", "--batch-size", "4", "--max-tokens", "8192"])
    out = capsys.readouterr().out
    assert code == 0
    assert "cuda:7" in out and "KV cache" in out
    assert "× 8192-token sequences" in out


def test_plan_json_round_trips_into_a_plan(llama_70b_config, capsys):
    main(["plan", str(llama_70b_config), "--max-memory", "0=80GiB,1=80GiB", "--json", "--max-tokens", "1024"])
    plan = Plan.from_json(capsys.readouterr().out)
    assert set(plan.device_map.values()) == {0, 1}
    assert plan.workload.max_tokens == 1024


def test_plan_that_cannot_fit_without_offload_exits_2_with_the_numbers(llama_70b_config, capsys):
    code = main(["plan", str(llama_70b_config), "--max-memory", "0=24GiB,1=24GiB", "--no-offload"])
    err = capsys.readouterr().err
    assert code == 2
    assert "offload=False" in err and "GiB" in err


@pytest.mark.parametrize("command", ["plan", "check"])
def test_a_batch_size_of_0_exits_2_naming_it(llama_70b_config, command, capsys):
    assert main([command, str(llama_70b_config), "--batch-size", "0"]) == 2
    assert "batch_size 0 must be an int of at least 1" in capsys.readouterr().err


def test_a_malformed_budget_exits_2_quoting_it(llama_70b_config, capsys):
    code = main(["plan", str(llama_70b_config), "--max-memory", "0=lots"])
    assert code == 2
    assert "'lots'" in capsys.readouterr().err


def test_a_missing_model_folder_exits_2_naming_it(tmp_path, capsys):
    code = main(["plan", str(tmp_path / "nowhere")])
    assert code == 2
    assert "nowhere" in capsys.readouterr().err


def test_generate_answers_with_the_demo_model_offloaded_to_disk_and_reports_speed_and_memory(demo_model, capsys):
    code = main(["generate", str(demo_model), "What is machine learning?", "--chat",
                 "--max-memory", "cpu=150MB", "--max-new-tokens", "8"])
    captured = capsys.readouterr()
    assert code == 0
    assert "Machine learning" in captured.out
    assert "disk" in captured.err and "execute on cpu" in captured.err
    assert "tokens/s" in captured.err
    assert "planned" in captured.err and "measured" in captured.err and "ratio" in captured.err
    assert "file-backed" in captured.err  # the mapped weights' pages, apart from the memory used


def test_generate_refuses_a_device_this_machine_lacks(demo_model, capsys):
    code = main(["generate", str(demo_model), "Hello", "--device-map", "cuda:7", "--max-new-tokens", "2"])
    assert code == 2
    assert "cuda:7" in capsys.readouterr().err


def _link_model_without_tokenizer(demo_model, folder):
    folder.mkdir()
    for path in demo_model.iterdir():
        if path.suffix in (".safetensors", ".json") and not path.name.startswith("tokenizer"):
            (folder / path.name).symlink_to(path)
    return folder


def test_a_mistyped_model_path_exits_2_naming_it_instead_of_becoming_a_prompt(capsys):
    code = main(["generate", "/does/not/exist", "Hello"])
    assert code == 2
    assert "model folder /does/not/exist does not exist" in capsys.readouterr().err


def test_a_folder_that_is_not_a_model_exits_2_naming_it(tmp_path, capsys):
    code = main(["generate", str(tmp_path), "Hello"])
    assert code == 2
    assert f"{tmp_path} is not a model folder: it has no config.json" in capsys.readouterr().err


def test_a_budget_without_a_unit_exits_2_suggesting_gib(llama_70b_config, capsys):
    code = main(["plan", str(llama_70b_config), "--max-memory", "0=24GiB,cpu=10"])
    assert code == 2
    assert "--max-memory cpu=10 has no unit; write cpu=10GiB" in capsys.readouterr().err


def test_an_offload_folder_that_cannot_be_created_exits_2_naming_it_and_why(llama_70b_config, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["plan", str(llama_70b_config), "--offload-folder", str(blocker / "offload")])
    assert code == 2
    assert f"--offload-folder {blocker / 'offload'} cannot be used: {blocker} is a file" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_offload_folder_on_a_file_system_that_takes_no_files_exits_2_naming_it(llama_70b_config, capsys):
    code = main(["plan", str(llama_70b_config), "--offload-folder", "/proc/offload", "--max-memory", "cpu=10GiB"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--offload-folder /proc/offload cannot be used: nothing can be created in /proc" in err


def test_a_gpu_this_machine_lacks_is_named_as_missing(demo_model, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda:0")
    code = main(["generate", str(demo_model), "Hello", "--device-map", "0"])
    assert code == 2
    assert "--device-map 0 means cuda:0, and this machine has no cuda:0 (it has cpu, disk)" in capsys.readouterr().err


@pytest.mark.parametrize("tokens", ["-5", "0"])
def test_max_new_tokens_below_1_exits_2_naming_the_flag(tokens, capsys):
    code = main(["generate", "Hello", "--max-new-tokens", tokens])
    assert code == 2
    assert f"--max-new-tokens {tokens} must be at least 1" in capsys.readouterr().err


def test_plan_pipeline_json_prints_the_stages_as_json(llama_70b_config, capsys):
    code = main(["plan", str(llama_70b_config), "--pipeline", "2", "--json", "--max-memory", "0=80GiB,1=80GiB"])
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert code == 0
    assert [stage["rank"] for stage in stages] == [0, 1]
    assert stages[0]["blocks"][0] == "model.embed_tokens" and stages[1]["blocks"][-1] == "lm_head"


def test_an_empty_prompt_exits_2(demo_model, capsys):
    code = main(["generate", str(demo_model), "Hello", " "])
    assert code == 2
    assert "prompt 2 of 2 is empty" in capsys.readouterr().err


def test_an_integer_dtype_exits_2_naming_the_dtypes_that_work_and_quantization(demo_model, capsys):
    code = main(["generate", str(demo_model), "Hello", "--dtype", "int8"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--dtype int8 is not a dtype devicemap loads weights in; use float32, float16, bfloat16" in err
    assert "quantized" in err


def test_a_model_folder_without_tokenizer_files_exits_2_saying_so(demo_model, tmp_path, capsys):
    folder = _link_model_without_tokenizer(demo_model, tmp_path / "model")
    code = main(["generate", str(folder), "Hello"])
    assert code == 2
    assert f"model folder {folder} has no tokenizer files" in capsys.readouterr().err


def test_plan_json_carries_the_device_map_that_from_pretrained_takes(demo_model, capsys):
    main(["plan", str(demo_model), "--max-memory", "cpu=1GiB", "--json"])
    text = capsys.readouterr().out
    assert json.loads(text)["device_map"] == Plan.from_json(text).device_map
    main(["plan", str(demo_model), "--max-memory", "cpu=1GiB", "--map"])
    device_map = json.loads(capsys.readouterr().out)
    model = AutoModelForCausalLM.from_pretrained(demo_model, device_map=device_map)
    assert model.lm_head.weight.device.type == "cpu"


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("devicemap ")


def test_help_imports_neither_torch_nor_transformers():
    script = (
        "import contextlib, io, sys\n"
        "from devicemap.cli import main\n"
        "for argv in (['--help'], ['plan', '--help'], ['generate', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_sampling_with_a_seed_repeats_and_several_prompts_come_back_as_json(demo_model, capsys):
    argv = ["generate", str(demo_model), "What is machine learning?", "Name a colour.", "--chat", "--json",
            "--temperature", "0.9", "--top-p", "0.9", "--top-k", "40", "--seed", "7", "--max-new-tokens", "6"]
    assert main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert [generation["text"] for generation in first] == [generation["text"] for generation in again]
    assert [generation["prompt"] for generation in first] == ["What is machine learning?", "Name a colour."]
    assert all(g["new_tokens"] == 6 and g["prompt_tokens"] > 0 and g["seconds"] > 0 for g in first)


def test_several_prompts_stream_one_after_another_between_separators(demo_model, capsys):
    code = main(["generate", str(demo_model), "What is machine learning?", "What is machine learning?", "--chat",
                 "--max-new-tokens", "8", "--kv-dtype", "float16"])
    captured = capsys.readouterr()
    answers = captured.out.split("-" * 40 + "\n")
    assert code == 0
    assert len(answers) == 2 and answers[0] == answers[1] and "Machine learning" in answers[0]
    assert captured.err.count("tokens/s") == 2
    assert "KV cache in float16" in captured.err


def test_generation_stops_at_a_stop_string_and_takes_a_system_message(demo_model, capsys):
    code = main(["generate", str(demo_model), "What is machine learning?", "--system", "Answer in one sentence.",
                 "--stop", "learning", "--json", "--max-new-tokens", "20"])
    [generation] = json.loads(capsys.readouterr().out)
    assert code == 0
    assert generation["text"].endswith("learning") and generation["new_tokens"] < 20


def test_a_prompt_from_standard_input_with_a_thread_count(demo_model):
    result = subprocess.run(
        [sys.executable, "-m", "devicemap.cli", "generate", str(demo_model), "-", "--threads", "1", "--json",
         "--max-new-tokens", "2"],
        input="What is machine learning?", capture_output=True, text=True, check=True,
    )  # fmt: skip
    [generation] = json.loads(result.stdout)
    assert generation["prompt"] == "What is machine learning?" and generation["new_tokens"] == 2


def test_a_prompt_from_a_file(demo_model, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("What is machine learning?")
    code = main(["generate", str(demo_model), "--file", str(prompt), "--json", "--max-new-tokens", "2"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)[0]["prompt"] == "What is machine learning?"


def test_options_may_come_between_the_model_and_the_prompts(demo_model, capsys):
    code = main(["generate", str(demo_model), "--json", "--max-new-tokens", "2", "What is machine learning?",
                 "Name a colour."])
    assert code == 0
    assert [g["prompt"] for g in json.loads(capsys.readouterr().out)] == ["What is machine learning?", "Name a colour."]


def test_an_unknown_option_after_the_prompt_exits_2_naming_it(demo_model, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(demo_model), "Hello", "--max-new-tokenz", "2"])
    assert exit_info.value.code == 2 and "--max-new-tokenz" in capsys.readouterr().err


def test_the_plan_table_names_the_blocks_each_device_holds_and_counts_them_as_the_reasons_do(demo_model, capsys):
    code = main(["plan", str(demo_model), "--max-memory", "cpu=150MB", "--max-tokens", "64"])
    out = capsys.readouterr().out
    assert code == 0
    # The CPU computes disk blocks in place, so it keeps no streaming room and holds two layers beside
    # the tied embedding and head.
    assert re.search(r"│ cpu +│ +4 │ embed_tokens, lm_head, layers 0-1", out)
    assert re.search(r"│ disk +│ +30 │ layers 2-29, norm, rotary_emb", out)
    assert "cpu holds 4 of 34 blocks with the workload's reserves; the last 30 (" in out


def test_plan_says_which_strategies_give_the_same_plan(llama_70b_config, capsys):
    main(["plan", str(llama_70b_config), "--max-memory", "0=80GiB,1=80GiB,disk=1TiB"])
    assert "- auto, balanced give this same plan" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="this machine has a cuda:1")
def test_planning_for_gpus_this_machine_lacks_takes_no_disk_budget_unless_asked(llama_70b_config, capsys):
    main(["plan", str(llama_70b_config), "--max-memory", "0=80GiB,1=80GiB", "--json"])
    assert "disk" not in dict(Plan.from_json(capsys.readouterr().out).budgets)
    main(["plan", str(llama_70b_config), "--max-memory", "0=80GiB,1=80GiB"])
    assert "no disk budget, as this machine lacks cuda:0, cuda:1; add disk=SIZE" in capsys.readouterr().out
    main(["plan", str(llama_70b_config), "--max-memory", "0=80GiB,1=80GiB,disk=1TiB", "--json"])
    assert dict(Plan.from_json(capsys.readouterr().out).budgets)["disk"] == 2**40


def test_a_system_message_opens_the_chat(demo_model):
    tokenizer = AutoTokenizer.from_pretrained(demo_model)
    ids = tokenize(tokenizer, ["Hi"], chat=True, system="Answer in French.")["input_ids"][0]
    assert tokenizer.decode(ids).index("Answer in French.") < tokenizer.decode(ids).index("Hi")


def test_plan_without_a_workload_plans_the_longest_sequence_that_fits_and_says_so(demo_model, capsys):
    code = main(["plan", str(demo_model), "--max-memory", "cpu=150MB"])
    assert code == 0
    assert "no workload given: planned for 1 × 1,972 tokens, the most that fit" in capsys.readouterr().out


def test_plan_prints_the_prefill_chunk_it_reserved_activations_for(llama_70b_config, capsys):
    gpus = ",".join(f"{i}=80GiB" for i in range(8))
    main(["plan", str(llama_70b_config), "--max-memory", gpus, "--batch-size", "4", "--prefill-chunk", "1024"])
    out = capsys.readouterr().out
    assert "prefill in chunks of 1,024 tokens" in out
    assert "generation_config.prefill_chunk_size = 1024" in out
    main(["plan", str(llama_70b_config), "--max-memory", gpus, "--batch-size", "4", "--prefill-chunk", "0"])
    assert "prefill whole" in capsys.readouterr().out


def test_generate_prefills_in_the_chunk_asked_with_the_text_of_a_whole_prefill(demo_model, capsys):
    argv = ["generate", str(demo_model), "What is machine learning?", "--chat", "--json", "--max-new-tokens", "8"]
    assert main([*argv, "--prefill-chunk", "0"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert main([*argv, "--prefill-chunk", "8"]) == 0
    captured = capsys.readouterr()
    assert "prefill in chunks of 8 tokens" in captured.err
    assert [g["text"] for g in json.loads(captured.out)] == [g["text"] for g in whole]


@pytest.mark.parametrize("argv", [["--prefill-chunk", "-1"], ["--prefill-chunk", "8", "--pipeline", "2"]])
def test_a_prefill_chunk_that_cannot_be_honoured_exits_2_naming_it(argv, capsys):
    code = main(["generate", "Hello", "--max-new-tokens", "2", *argv])
    assert code == 2
    assert "prefill" in capsys.readouterr().err
