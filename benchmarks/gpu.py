"""The GPU check: devicemap's CUDA paths run on a real GPU, in one command, within 10 minutes.

    python -m benchmarks gpu [--quick] [--demo-model PATH]

Each check runs in a fresh process, so that a CUDA error cannot spoil the next one:

- gpu tests: every test marked ``gpu`` (``pytest -m gpu``): blocks streamed to the GPU
  against the plain model, also with every copy, or every compute, held back on its
  stream so that a missing wait between the two shows as wrong tokens; a model loaded
  inside ``torch.inference_mode()``; ``dispatch`` of a module already on a GPU with a
  block on disk; NCCL stages where there are two GPUs.
- demo bf16: the demo model planned, loaded and generating in bfloat16, token for token
  what transformers generates on the same GPU.
- memory: a TinyLlama-1.1B-shaped model with half its layers in CPU memory, at a
  4 × 1024-token workload: the peak memory each GPU allocated against what the plan reserved.
- streaming: the same model's greedy decode, token for token as the model all on the GPU,
  at least half the rate its offloaded bytes allow at the host-to-device bandwidth measured.
- gpu tests, sanitizer: the gpu tests again under ``TORCH_CUDA_SANITIZER=1``, which fails
  any kernel touching a tensor that another stream uses without waiting for it.

``--quick`` runs the gpu tests and the demo model only. The run prints a table and exits
with 1 when a check fails; on a machine without CUDA it says so and checks nothing.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from .speed_cases import layer_map
from .speed_checkpoints import cache_folder, demo_source, layer_bytes, layer_count, tinyllama_model

REPOSITORY = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "
BUDGET_S = 570  # the whole run, under the 10 minutes it promises
STREAMING_SHARE = 0.5  # of the host-to-device bound that streamed decoding must reach
MEMORY_WORKLOAD = (4, 1024)  # batch, tokens
NEW_TOKENS = 32
_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


@dataclass(frozen=True)
class Check:
    """One line of the table: a name, the longest it may take, how it runs, and how its output is judged.

    ``judge`` takes the process's exit status and output and says whether it passed, and why.
    """

    name: str
    limit_s: float
    command: tuple[str, ...]
    judge: Callable[[int, str], tuple[bool, str]]
    environment: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Outcome:
    """What one check found: whether it passed, and the figure that says so."""

    name: str
    passed: bool
    figure: str
    seconds: float = 0.0


def main(argv: list[str] | None = None) -> int:
    """Run every check (only the quick ones with ``--quick``); 1 when one fails, 0 without CUDA."""
    arguments = parse_arguments(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    if not torch.cuda.is_available():
        console.print("no CUDA device on this machine: the GPU check needs one, so it checked nothing")
        return 0
    console.print(f"GPU check on {torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} visible)")
    deadline = time.monotonic() + BUDGET_S
    outcomes = []
    for check in checks(arguments.quick, arguments.demo_model):
        outcomes.append(run_check(check, deadline))
        console.print(f"{check.name}: {'passed' if outcomes[-1].passed else 'FAILED'}", highlight=False)
    console.print(table(outcomes))
    return exit_status(outcomes)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the gpu tests and the demo model only")
    parser.add_argument("--demo-model", metavar="PATH", help="this folder as the demo model, not the cached one")
    parser.add_argument("--one", choices=sorted(MEASURES), help=argparse.SUPPRESS)  # one check, in this process
    return parser.parse_args(argv)


def checks(quick: bool, demo_model: str | None) -> list[Check]:
    """The checks of a run, in the order they run: the quickest and most telling first."""
    tests = (sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", str(REPOSITORY / "tests"))
    demo = ("--demo-model", demo_model) if demo_model else ()
    measure = (sys.executable, "-m", "benchmarks.gpu", *demo, "--one")
    every = [
        Check("gpu tests", 150, tests, judge_tests),
        Check("demo bf16", 90, (*measure, "demo-bf16"), judge_measure),
        Check("memory", 150, (*measure, "memory"), judge_measure),
        Check("streaming", 90, (*measure, "streaming"), judge_measure),
        Check("gpu tests, sanitizer", 240, tests, judge_tests, (("TORCH_CUDA_SANITIZER", "1"),)),
    ]
    return every[:2] if quick else every


def run_check(check: Check, deadline: float) -> Outcome:
    """Run one check in its own process, for no longer than its limit or what is left of the run."""
    limit_s = min(check.limit_s, deadline - time.monotonic())
    if limit_s <= 0:
        return Outcome(check.name, False, f"not run: the {BUDGET_S} s of the run were spent")
    environment = {**os.environ, **_ENVIRONMENT, **dict(check.environment), "PYTHONPATH": _python_path()}
    started = time.monotonic()
    try:
        finished = subprocess.run(check.command, cwd=REPOSITORY, capture_output=True, text=True, timeout=limit_s,
                                  env=environment)  # fmt: skip
    except subprocess.TimeoutExpired:
        return Outcome(check.name, False, f"ran past its {limit_s:.0f} s", time.monotonic() - started)
    # stderr first: the last line is the summary a test run prints, or the error a check died of.
    passed, figure = check.judge(finished.returncode, finished.stderr + finished.stdout)
    return Outcome(check.name, passed, figure, time.monotonic() - started)


def judge_tests(returncode: int, output: str) -> tuple[bool, str]:
    """Whether a pytest run passed with at least one test run, and its summary line.

    >>> judge_tests(0, "....\\n12 passed, 4 skipped in 31.20s\\n")
    (True, '12 passed, 4 skipped in 31.20s')
    >>> judge_tests(0, "4 skipped in 2.10s")
    (False, '4 skipped in 2.10s')
    """
    summary = _last_line(output)
    ran = re.search(r"(\d+) passed", summary)
    return returncode == 0 and ran is not None and int(ran.group(1)) > 0, summary


def judge_measure(returncode: int, output: str) -> tuple[bool, str]:
    """The verdict a measured check printed, or why it printed none (the last line it wrote).

    >>> judge_measure(0, 'RESULT {"name": "memory", "passed": true, "figure": "0.9 of planned", "seconds": 0}')
    (True, '0.9 of planned')
    >>> judge_measure(1, "Traceback (most recent call last):\\nRuntimeError: CUDA error: out of memory")
    (False, 'RuntimeError: CUDA error: out of memory')
    """
    results = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    if returncode != 0 or not results:
        return False, _last_line(output) or f"exited with {returncode}"
    found = json.loads(results[-1].removeprefix(RESULT_PREFIX))
    return found["passed"], found["figure"]


def exit_status(outcomes: list[Outcome]) -> int:
    """0 when every check passed, else 1.

    >>> exit_status([Outcome("memory", True, "0.8 of planned"), Outcome("streaming", False, "0.2 of the bound")])
    1
    """
    return 0 if all(outcome.passed for outcome in outcomes) else 1


def table(outcomes: list[Outcome]) -> Table:
    """One row per check: its verdict, its figure and how long it took."""
    result = Table(title="devicemap on CUDA")
    for column in ("check", "result", "figure", "s"):
        result.add_column(column, justify="right" if column == "s" else "left")
    for outcome in outcomes:
        verdict = "[green]pass[/green]" if outcome.passed else "[red]FAIL[/red]"
        result.add_row(outcome.name, verdict, outcome.figure, f"{outcome.seconds:.0f}")
    return result


# The measured checks, each run as ``python -m benchmarks.gpu --one NAME`` in a fresh process.


def check_demo_bf16(demo_model: str | None) -> Outcome:
    """The demo model planned, loaded and generating in bfloat16, against transformers on the same GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import devicemap

    folder = demo_source(demo_model)
    plan = devicemap.plan(str(folder), "auto", dtype=torch.bfloat16)
    model = devicemap.load(str(folder), device_map=plan, dtype=torch.bfloat16, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(["What is machine learning?"], return_tensors="pt").to("cuda:0")
    output = _greedy(model, inputs["input_ids"], NEW_TOKENS)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to("cuda:0")
    same = torch.equal(output, _greedy(reference, inputs["input_ids"], NEW_TOKENS))
    on_gpu = all(placement.device.startswith("cuda:") for placement in plan.placements)
    text = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    where = "all on GPU" if on_gpu else f"planned {plan.device_map}"
    verdict = "as transformers" if same else "NOT as transformers"
    return Outcome("demo bf16", same and on_gpu, f"{where}; {NEW_TOKENS} tokens {verdict}: {text[:60]!r}")


def check_memory(demo_model: str | None) -> Outcome:
    """Peak memory each GPU allocated at the plan's workload, against what the plan reserved there."""
    import devicemap

    model_info = tinyllama_model(cache_folder())
    batch, tokens = MEMORY_WORKLOAD
    half_in_cpu = layer_map(layer_count(model_info), layer_count(model_info) // 2, "cpu", home=0)
    plan = devicemap.plan(str(model_info.folder), half_in_cpu, workload=devicemap.Workload(batch, tokens))
    model = devicemap.load(str(model_info.folder), device_map=plan, progress=False)
    _greedy(model, _prompt(model, batch, tokens - NEW_TOKENS), NEW_TOKENS)
    torch.cuda.synchronize()
    rows = [row for row in plan.ledger if row.device.startswith("cuda:")]
    used = {row.device: torch.cuda.max_memory_allocated(torch.device(row.device)) for row in rows}
    figure = "; ".join(f"{row.device} used {_gib(used[row.device])} of {_gib(row.used_bytes)} planned" for row in rows)
    passed = all(used[row.device] <= row.used_bytes for row in rows)
    return Outcome("memory", passed, f"{figure} at {batch} × {tokens} tokens")


def check_streaming(demo_model: str | None) -> Outcome:
    """Streamed greedy decode: the tokens of the model all on the GPU, at a share of the copy bound."""
    from transformers import AutoModelForCausalLM

    import devicemap

    from .speed_worker import generate, measure_host_to_device, prompt_ids, time_decode

    model_info = tinyllama_model(cache_folder())
    first_offloaded = layer_count(model_info) // 2
    device_map = layer_map(layer_count(model_info), first_offloaded, "cpu", home=0)
    model = devicemap.load(str(model_info.folder), device_map=device_map, progress=False)
    case, settings = {"gpu": True}, {"decode_prompt_tokens": 8, "new_tokens": NEW_TOKENS}
    decoded = time_decode(model, case, settings)
    tokens_per_s = 1 / decoded["decode_median_step_s"]
    copy_bound = measure_host_to_device(layer_bytes(model_info, first_offloaded))
    del model
    reference = AutoModelForCausalLM.from_pretrained(model_info.folder, dtype=torch.bfloat16).to("cuda:0")
    expected = generate(reference, prompt_ids(reference, settings["decode_prompt_tokens"], case), NEW_TOKENS)
    same = decoded["tokens"] == expected[0, -NEW_TOKENS:].tolist()
    bound, bandwidth = copy_bound["bound_tokens_per_s"], copy_bound["h2d_bytes_per_s"]
    share = tokens_per_s / bound
    tokens = "as" if same else "NOT as"
    figure = f"{tokens_per_s:.1f} tokens/s = {share:.2f} × the H2D bound {bound:.1f} ({bandwidth / 1e9:.1f} GB/s); "
    figure += f"tokens {tokens} all on the GPU"
    return Outcome("streaming", same and share >= STREAMING_SHARE, figure)


MEASURES: dict[str, Callable[[str | None], Outcome]] = {
    "demo-bf16": check_demo_bf16,
    "memory": check_memory,
    "streaming": check_streaming,
}


def _greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Exactly ``new_tokens`` greedy tokens after ``prompt`` (end-of-sequence does not stop them)."""
    with torch.inference_mode():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip


def _prompt(model, batch: int, length: int) -> torch.Tensor:
    """A fixed draw of ordinary token ids (past the special ones at the start of a vocabulary), on GPU 0."""
    generator = torch.Generator().manual_seed(length)
    return torch.randint(100, model.config.vocab_size, (batch, length), generator=generator).to("cuda:0")


def _gib(size_bytes: int) -> str:
    return f"{size_bytes / 2**30:.2f} GiB"


def _python_path() -> str:
    """This tree's devicemap and benchmarks first, whatever is installed."""
    return os.pathsep.join([str(REPOSITORY / "src"), str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])])


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run_one(name: str, demo_model: str | None) -> int:
    """Run the measured check ``name`` here and print its outcome for the parent process."""
    outcome = MEASURES[name](demo_model)
    print(RESULT_PREFIX + json.dumps(asdict(outcome)), flush=True)
    return 0


if __name__ == "__main__":
    parsed = parse_arguments(sys.argv[1:])
    sys.exit(_run_one(parsed.one, parsed.demo_model) if parsed.one else main(sys.argv[1:]))
