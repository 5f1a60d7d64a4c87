"""The pipeline: stages planned per rank, generation across processes identical to one process, faults.

Every pipeline here runs real gloo worker processes with one thread each; a few are
started per module and shared by the tests that only generate.
"""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
import torch
from models import DECODER_TYPES
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.core_model_loading import revert_weight_conversion

from devicemap.errors import DoesNotFitError, PipelineError
from devicemap.model.profile import Block, Profile
from devicemap.pipeline import Pipeline, plan_stages
from devicemap.pipeline.stage_model import build_stage
from devicemap.planning.stages import parse_rank_budgets, split_stages
from devicemap.runtime.api import profile_of
from devicemap.runtime.prompts import tokenize
from devicemap.storage.shards import write_sharded
from devicemap.workload import Workload

# Every test here starts worker processes, or plans and loads a real model for them.
pytestmark = pytest.mark.slow

PROMPTS = [
    "What is machine learning?",
    "Hi",
    "Tell me a story about a dragon who",
    "2+2=",
    "The capital of France is",
    "Why is the sky blue? Explain it to a child, in detail please",
]
# Ragged prompts for the random-weight models (no tokenizer): token ids of different lengths.
RANDOM_PROMPTS = [[5, 17, 300, 42, 9], [7], [100, 200, 300], [11, 12, 13, 14, 15, 16, 17, 18], [3, 4]]


def _save_qwen2(folder: Path) -> Path:
    """A small random-weight Qwen2 model (layers 3-5 attend through a 4-token sliding window, biases on q/k/v)."""
    config = Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0,
        use_sliding_window=True, sliding_window=4, max_window_layers=3,
    )  # fmt: skip
    config.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    folder.mkdir(parents=True)
    write_sharded(folder, revert_weight_conversion(model, model.state_dict()), 2)
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """References run single-threaded, like the stages: on a shared machine, two busy-waiting
    OpenMP threads make a 6-token generate take seconds instead of a fraction of one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory) -> Path:
    return _save_qwen2(tmp_path_factory.mktemp("pipeline") / "qwen2")


@pytest.fixture(scope="module")
def demo_pipe(demo_model):
    with Pipeline(demo_model, stages=2, device="cpu", threads_per_stage=1, timeout_s=60) as pipe:
        yield pipe


@pytest.fixture(scope="module")
def demo_reference(demo_model):
    return AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def demo_batch(demo_model):
    return tokenize(AutoTokenizer.from_pretrained(demo_model), PROMPTS)


def _reference(model, input_ids, attention_mask, **options) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False, **options)


def _layers(stage) -> int:
    return sum(name.startswith("model.layers.") for name in stage.blocks)


def _gone(pids) -> bool:
    """Every process has exited and been reaped (a zombie would still exist)."""
    return not any(psutil.pid_exists(pid) for pid in pids)


# Stage planning: pure, no process.


def test_stages_are_contiguous_cover_every_block_and_put_embedding_first_and_head_last(demo_model):
    plan = plan_stages(demo_model, 3, max_memory=[2**30] * 3)
    blocks = [name for stage in plan.stages for name in stage.blocks]
    assert blocks == [block.name for block in profile_of(demo_model).blocks]
    assert plan.stages[0].blocks[0] == "model.embed_tokens"
    assert plan.stages[-1].blocks[-1] == "lm_head"


def test_stages_balance_decode_work_so_the_stage_with_the_head_holds_fewer_layers(demo_model):
    first, last = split_stages(profile_of(demo_model), [2**30, 2**30]).stages
    assert _layers(first) == 18 and _layers(last) == 12


def test_a_rank_with_a_tight_budget_gets_fewer_layers_and_the_other_takes_the_rest(demo_model):
    small, large = split_stages(profile_of(demo_model), [350 * 2**20, 2 * 2**30]).stages
    assert small.used_bytes <= small.budget_bytes
    assert _layers(small) < 10 and _layers(small) + _layers(large) == 30


def test_a_tied_embedding_is_counted_on_the_first_and_the_last_stage(demo_model):
    profile = profile_of(demo_model)
    embedding = next(block.weight_bytes for block in profile.blocks if block.name == "model.embed_tokens")
    first, last = split_stages(profile, [2**30, 2**30]).stages
    layer_bytes = sum(block.weight_bytes for block in profile.blocks if block.name in last.blocks)
    assert first.weight_bytes >= embedding
    assert last.weight_bytes >= layer_bytes + embedding


def test_stages_that_cannot_fit_say_what_is_needed_and_what_each_rank_has(demo_model):
    with pytest.raises(DoesNotFitError, match=r"rank 0 100\.0 MiB, rank 1 100\.0 MiB.*more memory"):
        plan_stages(demo_model, 2, max_memory="0=100MiB,1=100MiB")


# Rank 1 cannot hold its stage in 350 MiB; rank 0 has no disk to offload to.
TIGHT_RANK_1 = dict(max_memory="0=300MiB,1=350MiB", workload=Workload(6, 64), offload=[{}, {"disk": "1GiB"}])


def test_a_rank_whose_budget_cannot_hold_its_stage_offloads_its_tail_to_disk(demo_model):
    plan = plan_stages(demo_model, 2, device="cpu", **TIGHT_RANK_1)
    first, second = plan.stages
    assert not first.offloaded and first.used_bytes <= first.budget_bytes
    assert second.used_bytes <= second.budget_bytes
    assert [tier for _, tier in second.offloaded] == ["disk"] * len(second.offloaded)
    assert second.offloaded[-1][0] == "lm_head" and second.offloaded_bytes > 0
    assert f"{len(second.offloaded)} blocks" in str(plan) and "on disk" in str(plan)


def test_stages_that_cannot_fit_even_offloading_name_each_rank_budget_and_offload(demo_model):
    with pytest.raises(DoesNotFitError, match=r"rank 0 100\.0 MiB, rank 1 100\.0 MiB.*even offloading.*rank 1 disk 1\.0 GiB"):
        plan_stages(demo_model, 2, device="cpu", max_memory="0=100MiB,1=100MiB", offload=[{}, {"disk": "1GiB"}])


def test_every_rank_gets_a_block_and_more_ranks_than_blocks_is_an_error():
    toy = Profile("toy", "float32", tuple(Block(f"layers.{i}", 10) for i in range(4)))
    assert [len(stage.blocks) for stage in split_stages(toy, [100, 100, 100, 100]).stages] == [1, 1, 1, 1]
    with pytest.raises(PipelineError, match="toy has 4 blocks, which cannot make 5 non-empty stages"):
        split_stages(toy, [100] * 5)


def test_rank_budgets_name_ranks_of_the_pipeline_only():
    assert parse_rank_budgets({0: "1GiB", "1": 500}, 2) == {0: 2**30, 1: 500}
    with pytest.raises(PipelineError, match="'cpu', which is not a rank of this 2-stage pipeline"):
        parse_rank_budgets("0=1GiB,cpu=2GiB", 2)


# Generation: identical to the single-process model.


def test_two_stages_greedy_equals_transformers_generate_on_a_ragged_batch(demo_pipe, demo_reference, demo_batch):
    ids, mask = demo_batch["input_ids"], demo_batch["attention_mask"]
    expected = _reference(demo_reference, ids, mask, max_new_tokens=8)
    assert torch.equal(demo_pipe.generate(ids, mask, max_new_tokens=8), expected)


def test_sequences_that_hit_eos_early_continue_with_padding_as_in_generate(demo_pipe, demo_reference, demo_batch):
    ids, mask = demo_batch["input_ids"], demo_batch["attention_mask"]
    free_run = _reference(demo_reference, ids, mask, max_new_tokens=6, eos_token_id=None)
    # The second token of each of the first micro-batch's rows becomes an EOS: that whole
    # micro-batch stops after two steps while the other one goes on.
    eos = sorted({int(token) for token in free_run[:3, ids.shape[1] + 1]})
    expected = _reference(demo_reference, ids, mask, max_new_tokens=6, eos_token_id=eos)
    assert (expected[:3, ids.shape[1] + 2 :] == demo_reference.generation_config.pad_token_id).all()
    assert torch.equal(demo_pipe.generate(ids, mask, max_new_tokens=6, eos_token_id=eos), expected)


def test_one_new_token_stops_every_micro_batch_right_after_its_prompt(demo_pipe, demo_reference, demo_batch):
    ids, mask = demo_batch["input_ids"], demo_batch["attention_mask"]
    expected = _reference(demo_reference, ids, mask, max_new_tokens=1)
    assert torch.equal(demo_pipe.generate(ids, mask, max_new_tokens=1), expected)
    # the stage after it expected a decode step and got the stop notice; the next request still runs
    expected = _reference(demo_reference, ids, mask, max_new_tokens=2)
    assert torch.equal(demo_pipe.generate(ids, mask, max_new_tokens=2), expected)


def test_right_padding_and_token_lists_give_the_left_padded_result(demo_pipe, demo_batch):
    ids, mask = demo_batch["input_ids"], demo_batch["attention_mask"]
    rows = [row[row_mask.bool()].tolist() for row, row_mask in zip(ids, mask)]
    right_ids = torch.tensor([row + [0] * (ids.shape[1] - len(row)) for row in rows])
    right_mask = torch.tensor([[1] * len(row) + [0] * (ids.shape[1] - len(row)) for row in rows])
    expected = demo_pipe.generate(ids, mask, max_new_tokens=4)
    assert torch.equal(demo_pipe.generate(right_ids, right_mask, max_new_tokens=4), expected)
    assert torch.equal(demo_pipe.generate(rows, max_new_tokens=4), expected)


def test_sampling_with_a_seed_repeats_whatever_the_micro_batches_and_another_seed_differs(demo_pipe, demo_batch):
    ids, mask = demo_batch["input_ids"], demo_batch["attention_mask"]
    options = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=100, eos_token_id=[])
    first = demo_pipe.generate(ids, mask, seed=7, **options)
    assert torch.equal(demo_pipe.generate(ids, mask, seed=7, micro_batches=1, **options), first)
    assert not torch.equal(demo_pipe.generate(ids, mask, seed=8, **options), first)


def test_three_stages_of_the_demo_model_generate_text_like_transformers(demo_model, demo_reference, demo_batch):
    ids, mask = demo_batch["input_ids"], demo_batch["attention_mask"]
    with Pipeline(demo_model, stages=3, device="cpu", threads_per_stage=1, timeout_s=60) as pipe:
        texts = pipe.generate_text(PROMPTS[:2], max_new_tokens=5)
        output = pipe.generate(ids, mask, max_new_tokens=5, micro_batches=4)
    assert torch.equal(output, _reference(demo_reference, ids, mask, max_new_tokens=5))
    assert texts[0].strip().startswith("Machine learning")


@pytest.mark.parametrize(("kind", "stages", "dtype"), [("qwen3-moe", 3, torch.float32), ("qwen2", 2, torch.bfloat16)])
def test_random_models_of_other_architectures_in_stages_equal_transformers_generate(
    kind, stages, dtype, random_model_folder, qwen2
):
    folder = qwen2 if kind == "qwen2" else random_model_folder(kind)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with Pipeline(folder, stages=stages, dtype=dtype, device="cpu", threads_per_stage=1, timeout_s=60) as pipe:
        output = pipe.generate(RANDOM_PROMPTS, max_new_tokens=7)
    width = max(len(row) for row in RANDOM_PROMPTS)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in RANDOM_PROMPTS])
    assert torch.equal(output, _reference(reference, output[:, :width], mask, max_new_tokens=7))


@pytest.mark.parametrize("kind", DECODER_TYPES)
def test_every_other_supported_architecture_in_two_stages_equals_transformers_generate(kind, random_model_folder):
    folder = random_model_folder(kind, shards=2)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    with Pipeline(folder, stages=2, device="cpu", threads_per_stage=1, timeout_s=60) as pipe:
        output = pipe.generate(RANDOM_PROMPTS, max_new_tokens=7)
    width = max(len(row) for row in RANDOM_PROMPTS)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in RANDOM_PROMPTS])
    assert torch.equal(output, _reference(reference, output[:, :width], mask, max_new_tokens=7))


def test_a_model_the_pipeline_cannot_split_is_refused_before_any_process_starts(random_model_folder):
    children = set(psutil.Process().children(recursive=True))
    with pytest.raises(PipelineError, match=r"model type 'gpt2' is not supported .* olmo2, .* devicemap\.load"):
        Pipeline(random_model_folder("gpt2"), stages=2, device="cpu")
    assert set(psutil.Process().children(recursive=True)) == children


def test_a_weightless_final_norm_runs_on_the_stage_with_the_head(random_model_folder):
    # OLMo's final norm has no weights, so it is no block of the plan; it must still run once.
    blocks = ("model.layers.5", "lm_head")
    stage = build_stage(random_model_folder("olmo", shards=2), blocks, torch.device("cpu"))
    assert stage.layout.norm and stage.layout.head
    assert not isinstance(stage.decoder.norm, nn.Identity)


def test_a_stages_sliding_window_layers_keep_only_their_window_after_a_long_prompt(qwen2):
    blocks = ("model.embed_tokens", "model.rotary_emb", *(f"model.layers.{i}" for i in range(3, 6)))
    stage = build_stage(qwen2, blocks, torch.device("cpu"))
    cache = stage.new_cache()
    prompt = torch.arange(1, 21).reshape(1, 20)
    stage.forward(prompt, torch.ones_like(prompt), torch.arange(20).reshape(1, 20), cache)
    for index in (3, 4, 5):
        keys = cache.layers[index].keys
        assert keys.shape[-2] == 3
        assert keys.untyped_storage().nbytes() == keys.nbytes, "the whole prompt is not kept alive"


def test_a_rank_offloading_to_disk_generates_what_transformers_generates(demo_model, demo_reference, demo_batch, tmp_path):
    ids, mask = demo_batch["input_ids"], demo_batch["attention_mask"]
    options = dict(device="cpu", threads_per_stage=1, timeout_s=60, offload_folder=tmp_path, **TIGHT_RANK_1)
    with Pipeline(demo_model, stages=2, **options) as pipe:
        assert pipe.stage_plan.stages[1].offloaded
        output = pipe.generate(ids, mask, max_new_tokens=5)
    assert torch.equal(output, _reference(demo_reference, ids, mask, max_new_tokens=5))


# Faults: every rank stops, the error names the culprit, no process is left.


def test_a_killed_worker_stops_the_pipeline_with_an_error_naming_it(random_model_folder):
    pipe = Pipeline(random_model_folder("llama"), stages=2, device="cpu", threads_per_stage=1, timeout_s=60)
    outcome = {}

    def generate_for_long():
        try:
            pipe.generate(RANDOM_PROMPTS, max_new_tokens=100_000, eos_token_id=[])
        except PipelineError as error:
            outcome["error"] = error

    worker = threading.Thread(target=generate_for_long)
    worker.start()
    threading.Event().wait(1.0)  # let the request reach the ranks
    os.kill(pipe.pids[1], signal.SIGKILL)
    worker.join(timeout=30)
    assert not worker.is_alive()
    assert "rank 1 died: killed by signal SIGKILL" in str(outcome["error"])
    assert _gone(pipe.pids)


def test_a_hung_worker_is_named_once_the_timeout_passes(random_model_folder):
    pipe = Pipeline(random_model_folder("llama"), stages=2, device="cpu", threads_per_stage=1, timeout_s=3)
    os.kill(pipe.pids[1], signal.SIGSTOP)
    with pytest.raises(PipelineError, match=r"rank 1 stopped answering for more than the 3 s timeout"):
        pipe.generate(RANDOM_PROMPTS, max_new_tokens=4)
    assert _gone(pipe.pids)


def test_a_rank_that_fails_to_load_stops_every_rank_with_its_error(random_model_folder, tmp_path):
    folder = tmp_path / "broken"
    source = AutoModelForCausalLM.from_pretrained(random_model_folder("llama"), dtype=torch.float32)
    state = source.state_dict()
    state["model.layers.5.mlp.down_proj.weight"] = torch.zeros(3, 3)
    folder.mkdir()
    write_sharded(folder, state, 2)
    source.config.save_pretrained(folder)
    before = {child.pid for child in psutil.Process().children(recursive=True)}
    with pytest.raises(PipelineError, match=r"rank 1 failed: .*model\.layers\.5\.mlp\.down_proj\.weight expects"):
        Pipeline(folder, stages=2, device="cpu", threads_per_stage=1, timeout_s=60)
    assert {child.pid for child in psutil.Process().children(recursive=True)} <= before


def test_workers_exit_when_their_launcher_is_killed(random_model_folder):
    launcher = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH_AND_WAIT, str(random_model_folder("llama"))], stdout=subprocess.PIPE, text=True
    )
    pids = [int(pid) for pid in launcher.stdout.readline().split()]
    launcher.kill()
    launcher.wait()
    for pid in pids:
        _wait_until_exited(pid)


_LAUNCH_AND_WAIT = """
import sys, time
from devicemap.pipeline import Pipeline
pipe = Pipeline(sys.argv[1], stages=2, device="cpu", threads_per_stage=1)
print(*pipe.pids, flush=True)
time.sleep(600)
"""


def _wait_until_exited(pid: int, limit_s: float = 30) -> None:
    try:
        psutil.Process(pid).wait(limit_s)
    except psutil.NoSuchProcess:
        return
    except psutil.TimeoutExpired:
        pytest.fail(f"worker {pid} still runs {limit_s} s after its launcher was killed")


def test_torchrun_runs_the_same_rank_entry_point_through_the_command_line(demo_model, demo_pipe):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "devicemap", "generate", str(demo_model), "What is machine learning?", "--pipeline", "2",
        "--max-new-tokens", "6",
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120, env=environment)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert demo_pipe.generate_text(["What is machine learning?"], max_new_tokens=6)[0] in finished.stdout
