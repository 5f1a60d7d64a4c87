"""The pipeline suite: micro-batches through every stage at once, against one at a time.

    python -m benchmarks pipeline [--quick] [--runs N] [--demo-model PATH]
    python benchmarks/pipeline_bench.py [same options]

Two gloo processes with one thread each hold the demo model's two stages. A batch of 8
prompts generates 64 new tokens each, with no EOS stop so that every variant does the
same work. Variants, each run in turn in every round so a noisy neighbour slows all alike:

- pipelined: 2 micro-batches of 4; while stage 1 works on one, stage 0 works on the other;
- one micro-batch at a time: the same 2 micro-batches, each through both stages before
  the next starts (the two processes never compute at once);
- whole batch: 1 micro-batch of 8 (transformers' device_map behaviour: one device at a time);
- one process: the plain transformers model's ``generate`` on the same batch, one thread.

Tokens/s come from the best of the runs; the table shows pipelined ÷ each other variant
beside the issue's target. Two single-threaded ranks overlap only while two cores are
free, so the table also gives CPU-bound figures from each process's own CPU time: the
busiest rank's when ranks compute at once, their sum when they take turns. On a machine
others are using, those are the figures to compare. Results go to
benchmarks/results/pipeline.json.
"""

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from devicemap.pipeline import Pipeline
from devicemap.runtime.prompts import tokenize
from devicemap.storage.demo import demo_model_path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_OVER_ONE_AT_A_TIME = 1.6
PROMPTS = (
    "What is machine learning?",
    "Write a short poem about the sea.",
    "Explain how a transformer model works.",
    "Hi",
    "List three uses of a paperclip.",
    "What is the capital of France, and why is it famous?",
    "Tell me a story about a dragon who learned to read.",
    "Why is the sky blue?",
)


def main(argv: list[str] | None = None) -> int:
    """Run the suite with command-line options ``argv``; prints a table and writes JSON."""
    args = _parser().parse_args(argv)
    new_tokens = 8 if args.quick else args.new_tokens
    runs = 1 if args.quick else args.runs
    folder = Path(args.demo_model) if args.demo_model else demo_model_path()
    inputs = tokenize(AutoTokenizer.from_pretrained(folder), PROMPTS)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    measured: dict[str, list[Run]] = {variant.name: [] for variant in VARIANTS}
    load_before = os.getloadavg()[0]
    with Pipeline(folder, stages=2, device="cpu", threads_per_stage=1) as pipe:
        _check_identical(pipe, model, inputs)
        ranks = [psutil.Process(pid) for pid in pipe.pids]
        for _ in range(runs):
            for variant in VARIANTS:
                processes = [psutil.Process()] if variant.in_this_process else ranks
                call = variant.call(pipe, model, inputs, new_tokens)
                measured[variant.name].append(_measure(call, processes))
    result = _result(measured, len(PROMPTS) * new_tokens, new_tokens, folder)
    result["load_average"] = {"before": load_before, "after": os.getloadavg()[0], "cores": os.cpu_count()}
    console = Console(highlight=False, width=150)
    console.print(_table(result))
    console.print(
        f"load average {load_before:.1f} before, {result['load_average']['after']:.1f} after, on "
        f"{os.cpu_count()} cores. Two single-threaded stages overlap only while two cores are free; the CPU-bound "
        "columns take each process's own CPU time instead: the busiest rank when ranks overlap, their sum when not."
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "pipeline.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written to {path}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of 8 new tokens, as a smoke test")
    parser.add_argument("--runs", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    parser.add_argument("--demo-model", help="the converted demo model's folder (default: devicemap's cache)")
    return parser


@dataclass(frozen=True)
class Run:
    """One timed run: wall seconds, and CPU seconds of each process that did the work."""

    wall_s: float
    cpu_s: tuple[float, ...]


@dataclass(frozen=True)
class Variant:
    """A way to generate the batch; ``overlapping`` when its processes may compute at once."""

    name: str
    call: Callable
    overlapping: bool = False
    in_this_process: bool = False

    def cpu_bound_s(self, run: Run) -> float:
        """Wall time if every process had a core of its own."""
        return max(run.cpu_s) if self.overlapping else sum(run.cpu_s)


def _measure(call: Callable[[], object], processes: list[psutil.Process]) -> Run:
    cpu_before = [_cpu_s(process) for process in processes]
    started = time.perf_counter()
    call()
    wall_s = time.perf_counter() - started
    return Run(wall_s, tuple(_cpu_s(process) - before for process, before in zip(processes, cpu_before)))


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _pipeline_call(micro_batches: int, row_groups: int = 1):
    """Generate the batch in ``row_groups`` calls one after the other, each split into ``micro_batches``."""

    def call(pipe, model, inputs, new_tokens):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        groups = list(zip(ids.chunk(row_groups), mask.chunk(row_groups)))
        options = dict(max_new_tokens=new_tokens, eos_token_id=[], micro_batches=micro_batches)
        return lambda: [pipe.generate(group_ids, group_mask, **options) for group_ids, group_mask in groups]

    return call


def _one_process_call(pipe, model, inputs, new_tokens):
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return lambda: _plain_generate(model, inputs, **options)


def _plain_generate(model, inputs, **options):
    with torch.inference_mode():
        return model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **options)


VARIANTS = (
    Variant("pipelined", _pipeline_call(micro_batches=2), overlapping=True),
    Variant("one micro-batch at a time", _pipeline_call(micro_batches=1, row_groups=2)),
    Variant("whole batch (device_map)", _pipeline_call(micro_batches=1)),
    Variant("one process, one thread", _one_process_call, in_this_process=True),
)


def _check_identical(pipe, model, inputs) -> None:
    """The figures mean nothing if the pipeline's text differs: compare greedy outputs first."""
    ours = pipe.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=16)
    if not torch.equal(ours, _plain_generate(model, inputs, max_new_tokens=16, do_sample=False)):
        raise SystemExit("the pipeline's greedy output differs from transformers' generate; not benchmarking")


def _result(measured: dict[str, list[Run]], tokens: int, new_tokens: int, folder: Path) -> dict:
    variants = {variant.name: variant for variant in VARIANTS}
    wall = {name: tokens / min(run.wall_s for run in runs) for name, runs in measured.items()}
    bound = {name: tokens / min(variants[name].cpu_bound_s(run) for run in runs) for name, runs in measured.items()}
    return {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "model": str(folder),
        "batch": len(PROMPTS),
        "new_tokens": new_tokens,
        "stages": 2,
        "threads_per_stage": 1,
        "runs": {name: [asdict(run) for run in runs] for name, runs in measured.items()},
        "tokens_per_s": wall,
        "tokens_per_s_cpu_bound": bound,
        "pipelined_over": {name: wall["pipelined"] / rate for name, rate in wall.items() if name != "pipelined"},
        "pipelined_over_cpu_bound": {
            name: bound["pipelined"] / rate for name, rate in bound.items() if name != "pipelined"
        },
        "target_over_one_at_a_time": TARGET_OVER_ONE_AT_A_TIME,
    }


def _table(result: dict) -> Table:
    title = f"pipeline: 2 gloo stages × 1 thread, batch {result['batch']}, {result['new_tokens']} new tokens"
    table = Table(title=title)
    columns = ("variant", "best wall s", "tokens/s", "pipelined ÷", "CPU s per process", "CPU-bound tokens/s",
               "pipelined ÷", "target")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, runs in result["runs"].items():
        best = min(runs, key=lambda run: run["wall_s"])
        target = f"≥ {TARGET_OVER_ONE_AT_A_TIME}" if name == "one micro-batch at a time" else ""
        table.add_row(
            name,
            f"{best['wall_s']:.2f}",
            f"{result['tokens_per_s'][name]:.1f}",
            _ratio(result["pipelined_over"].get(name)),
            " + ".join(f"{cpu:.2f}" for cpu in best["cpu_s"]),
            f"{result['tokens_per_s_cpu_bound'][name]:.1f}",
            _ratio(result["pipelined_over_cpu_bound"].get(name)),
            target,
        )
    return table


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
