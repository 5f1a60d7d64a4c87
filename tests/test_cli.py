import json

import pytest

from devicemap.cli import main
from devicemap.planning.plan import Plan

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
    assert "cpu: planned" in captured.err and "resident" in captured.err


def test_generate_refuses_a_device_this_machine_lacks(demo_model, capsys):
    code = main(["generate", str(demo_model), "Hello", "--device-map", "cuda:7", "--max-new-tokens", "2"])
    assert code == 2
    assert "cuda:7" in capsys.readouterr().err
