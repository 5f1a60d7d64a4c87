"""A run measured against its plan: per device, the peak beyond the weights within [0.7, 1.0] of the reserve."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from devicemap.cli import main
from devicemap.model.profile import Block, Profile
from devicemap.planning.ledger import MASK_COPIES, price_units
from devicemap.storage.shards import write_sharded
from devicemap.workload import Workload

# Hidden states wide enough, and sequences long enough, that the reserves (20 to 170 MiB)
# dwarf what the runtime allocates beside them.
_SHAPE = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, vocab_size=1024, max_position_embeddings=4096,
              tie_word_embeddings=False)  # fmt: skip
KINDS = {
    "dense": ("llama", {}),
    "moe": ("qwen3_moe", {"moe_intermediate_size": 256, "num_experts": 8, "num_experts_per_tok": 2}),
    "sliding": ("mistral", {"sliding_window": 512}),
}
WORKLOADS = ((1, 1024), (2, 1024), (4, 2048))

# Runs in a fresh process, as `devicemap check` does: what earlier tests left in this one's heaps is no run's.
_MEASURE_ALL = """
import json, sys
import devicemap
from devicemap.runtime.measure import measure_run
results = {}
for folder, batch_size, max_tokens in json.loads(sys.argv[1]):
    model = devicemap.load(folder, device_map="cpu", max_memory={"cpu": "4GiB"}, progress=False,
                           workload=devicemap.Workload(batch_size, max_tokens))
    use = measure_run(model).devices[0]
    results[f"{folder}:{batch_size}x{max_tokens}"] = [use.planned_reserve_bytes, use.used_reserve_bytes]
    del model
print(json.dumps(results))
"""


def save_model(kind: str, folder: Path) -> Path:
    model_type, fields = KINDS[kind]
    config = AutoConfig.for_model(model_type, **_SHAPE, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True)
    write_sharded(folder, model.state_dict(), 1)
    config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[tuple[str, int, int], tuple[int, int]]:
    """(kind, batch size, max tokens) -> (planned reserve, measured peak beyond the weights) on the CPU."""
    folders = {kind: save_model(kind, tmp_path_factory.mktemp(kind) / kind) for kind in KINDS}
    cases = [(str(folders[kind]), batch, tokens) for kind in KINDS for batch, tokens in WORKLOADS]
    done = subprocess.run([sys.executable, "-c", _MEASURE_ALL, json.dumps(cases)], capture_output=True, text=True,
                          check=True)  # fmt: skip
    results = json.loads(done.stdout.splitlines()[-1])
    return {
        (kind, batch, tokens): tuple(results[f"{folders[kind]}:{batch}x{tokens}"])
        for kind in KINDS
        for batch, tokens in WORKLOADS
    }


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous memory is read from /proc")
@pytest.mark.parametrize("batch_size,max_tokens", WORKLOADS)
@pytest.mark.parametrize("kind", KINDS)
def test_a_run_uses_at_most_its_reserve_and_at_least_seven_tenths_of_it(measured, kind, batch_size, max_tokens):
    planned, used = measured[kind, batch_size, max_tokens]
    assert 0.7 * planned <= used <= planned, f"{kind} at {batch_size} × {max_tokens}: {used / planned:.2f} of the plan"


def test_a_sliding_window_block_reserves_its_whole_prompt_and_mask_while_it_runs():
    window = Block("layer", 0, kv_values_per_token=8, kv_window=4, activation_bytes_per_token=10)
    full = Block("layer", 0, kv_values_per_token=8, activation_bytes_per_token=10)
    workload = Workload(batch_size=2, max_tokens=16, kv_dtype="float32")
    (windowed,) = price_units(Profile("toy", "float32", (window,)), workload)
    (unwindowed,) = price_units(Profile("toy", "float32", (full,)), workload)
    assert windowed.prompt_kv_bytes == 8 * 4 * 2 * (16 - 4)  # values × bytes × batch × tokens past the window
    assert windowed.mask_bytes == MASK_COPIES * 2 * 16 * 16  # a byte per query and key, per sequence
    assert (unwindowed.prompt_kv_bytes, unwindowed.mask_bytes) == (0, 0)
    assert windowed.transient_bytes == 10 * 2 * 16 + windowed.prompt_kv_bytes + windowed.mask_bytes


def test_a_sliding_window_block_prefilled_in_chunks_holds_one_chunk_past_its_window_and_no_whole_prompt_mask():
    window = Block("layer", 0, kv_values_per_token=8, kv_window=4, activation_bytes_per_token=10)
    profile = Profile("toy", "float32", (window,), chunked_prefill=True)
    (chunked,) = price_units(profile, Workload(batch_size=2, max_tokens=64, kv_dtype="float32", prefill_chunk=8))
    (whole,) = price_units(profile, Workload(batch_size=2, max_tokens=64, kv_dtype="float32", prefill_chunk=0))
    assert chunked.prompt_kv_bytes == 8 * 4 * 2 * 8  # values × bytes × batch × one chunk
    assert whole.prompt_kv_bytes == 8 * 4 * 2 * (64 - 4)
    assert (chunked.mask_bytes, whole.mask_bytes) == (0, MASK_COPIES * 2 * 64 * 64)


def test_check_prints_planned_and_measured_per_device_and_exits_0_within_the_plan(tmp_path):
    folder = save_model("dense", tmp_path / "dense")
    command = ["check", str(folder), "--device-map", "cpu", "--max-memory", "cpu=1GiB", "--max-tokens", "1024"]
    # In a fresh process, as a person runs it: this one's heaps hold what earlier tests left.
    done = subprocess.run([sys.executable, "-m", "devicemap", *command], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "planned" in done.stderr and "measured" in done.stderr and "ratio" in done.stderr
    assert "run: batch 1 × 1020 random prompt tokens + 4 decoded, planned for batch 1 × 1024 tokens" in done.stderr


def test_check_refuses_a_folder_that_is_not_a_model(tmp_path, capsys):
    assert main(["check", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
