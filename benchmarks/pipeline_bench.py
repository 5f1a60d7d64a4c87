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
beside the issue's target. Results go to benchmarks/results/pipeline.json.
"""

import argparse
import json
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from devicemap.demo import demo_model_path
from devicemap.pipeline import Pipeline, tokenize

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
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenize(tokenizer, PROMPTS)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with Pipeline(folder, stages=2, device="cpu", threads_per_stage=1) as pipe:
        _check_identical(pipe, model, ids, mask)
        for _ in range(runs):
            for name, run in VARIANTS.items():
                seconds[name].append(run(pipe, model, ids, mask, new_tokens))
    tokens = len(PROMPTS) * new_tokens
    result = _result(seconds, tokens, new_tokens, folder)
    Console(highlight=False).print(_table(result))
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


def _timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _pipelined(pipe, model, ids, mask, new_tokens) -> float:
    return _timed(lambda: pipe.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=[], micro_batches=2))


def _one_at_a_time(pipe, model, ids, mask, new_tokens) -> float:
    half = ids.shape[0] // 2
    halves = [(ids[:half], mask[:half]), (ids[half:], mask[half:])]
    return _timed(
        lambda: [pipe.generate(i, m, max_new_tokens=new_tokens, eos_token_id=[], micro_batches=1) for i, m in halves]
    )


def _whole_batch(pipe, model, ids, mask, new_tokens) -> float:
    return _timed(lambda: pipe.generate(ids, mask, max_new_tokens=new_tokens, eos_token_id=[], micro_batches=1))


def _one_process(pipe, model, ids, mask, new_tokens) -> float:
    with torch.inference_mode():
        return _timed(
            lambda: model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
        )


VARIANTS = {
    "pipelined": _pipelined,
    "one micro-batch at a time": _one_at_a_time,
    "whole batch (device_map)": _whole_batch,
    "one process, one thread": _one_process,
}


def _check_identical(pipe, model, ids, mask) -> None:
    """The figures mean nothing if the pipeline's text differs: compare greedy outputs first."""
    ours = pipe.generate(ids, mask, max_new_tokens=16)
    with torch.inference_mode():
        theirs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    if not torch.equal(ours, theirs):
        raise SystemExit("the pipeline's greedy output differs from transformers' generate; not benchmarking")


def _result(seconds: dict[str, list[float]], tokens: int, new_tokens: int, folder: Path) -> dict:
    rates = {name: tokens / min(runs) for name, runs in seconds.items()}
    pipelined = rates["pipelined"]
    return {
        "when": datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s) here",
        "model": str(folder),
        "batch": len(PROMPTS),
        "new_tokens": new_tokens,
        "stages": 2,
        "threads_per_stage": 1,
        "seconds": seconds,
        "tokens_per_s": rates,
        "pipelined_over": {name: pipelined / rate for name, rate in rates.items() if name != "pipelined"},
        "target_over_one_at_a_time": TARGET_OVER_ONE_AT_A_TIME,
    }


def _table(result: dict) -> Table:
    table = Table(title=f"pipeline: 2 gloo stages × 1 thread, batch {result['batch']}, {result['new_tokens']} new tokens")
    for column in ("variant", "best s", "median s", "tokens/s", "pipelined ÷ this", "target"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for name, runs in result["seconds"].items():
        ratio = result["pipelined_over"].get(name)
        target = f"≥ {TARGET_OVER_ONE_AT_A_TIME}" if name == "one micro-batch at a time" else ""
        table.add_row(
            name,
            f"{min(runs):.2f}",
            f"{sorted(runs)[len(runs) // 2]:.2f}",
            f"{result['tokens_per_s'][name]:.1f}",
            "" if ratio is None else f"{ratio:.2f}",
            target,
        )
    return table


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
