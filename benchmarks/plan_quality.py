"""Plan quality: KV cache that fits beside the weights, as a ratio to the best contiguous split.

    python -m benchmarks.plan_quality [--quick]

For each model × machine × workload, every devicemap strategy and transformers' own
strategies (on the same meta model, in the same run) are judged by one accounting: the
batch × tokens of KV cache that fit before the first computing device runs out, divided by
the best contiguous split's (found independently in ``plan_reference``), and how many
blocks each spills to CPU or disk. Every GPU that computes keeps the runtime reserve
(``devices.CUDA_RUNTIME_RESERVE_BYTES``) in all three: it is memory any process holds there.
Beside them, how many sequences of the row's length devicemap "auto" fits with the prefill
planned whole and in its default chunks. Also times full plans of the largest models, meta
skeleton included. Prints a table and writes ``benchmarks/results/plan_quality.json``.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import PretrainedConfig

from benchmarks.plan_reference import Optimum, best_split, placements_of, transformers_device_map
from benchmarks.published_configs import PUBLISHED
from devicemap.devices import CUDA_RUNTIME_RESERVE_BYTES
from devicemap.errors import DoesNotFitError
from devicemap.model.profile import Profile, profile_config
from devicemap.model.skeleton import build_on_meta
from devicemap.planning.ledger import price_units
from devicemap.planning.plan import Plan
from devicemap.planning.planner import make_plan
from devicemap.workload import Workload

GiB = 2**30
RESULTS = Path(__file__).parent / "results" / "plan_quality.json"
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
TRANSFORMERS_STRATEGIES = ("auto", "balanced_low_0", "sequential")  # transformers' "balanced" is its "auto"
TARGET_RATIO = 0.99
TARGET_SECONDS = 2.0

MODELS = {
    "Llama-3-8B": PUBLISHED["llama-3-8b"],
    "Llama-3-70B": PUBLISHED["llama-3-70b"],
    "Mixtral-8x7B": PUBLISHED["mixtral-8x7b"],
    "Qwen3-30B-A3B": PUBLISHED["qwen3-30b-a3b"],
}
TIMED_MODELS = {"Llama-3.1-405B": PUBLISHED["llama-3.1-405b"], "DeepSeek-V3 (671B)": PUBLISHED["deepseek-v3"]}
HOST = {"cpu": 512 * GiB, "disk": 8192 * GiB}
MACHINES = {
    "2×24": [24, 24],
    "4×24": [24, 24, 24, 24],
    "2×80": [80, 80],
    "8×80": [80] * 8,
    "24+48": [24, 48],
    "3×16": [16, 16, 16],
}
WORKLOADS = (Workload(1, 4096), Workload(4, 8192))


@dataclass(frozen=True)
class Score:
    """One strategy on one row: KV room as a ratio to the best split, and blocks spilled."""

    ratio: float | None  # None: the strategy found no plan
    spilled_blocks: int
    split_blocks: int = 0


@dataclass(frozen=True)
class Fit:
    """Sequences of the row's length that a plan fits on its computing devices, and blocks it spills."""

    sequences: float | None  # None: no plan
    spilled_blocks: int


@dataclass(frozen=True)
class Row:
    model: str
    machine: str
    workload: str
    fits_on_gpus: bool
    best_kv_tokens: float
    devicemap: dict[str, Score]
    transformers: dict[str, Score]
    whole_prefill: Fit
    chunked_prefill: Fit


def budgets_of(machine: str) -> dict[str, int]:
    return {**{f"cuda:{i}": size * GiB for i, size in enumerate(MACHINES[machine])}, **HOST}


def reserves_of(budgets: dict[str, int]) -> dict[str, int]:
    """Every GPU's runtime reserve at its default, whatever this machine's environment sets."""
    return {device: CUDA_RUNTIME_RESERVE_BYTES for device in budgets if device.startswith("cuda:")}


@cache
def model_of(name: str) -> tuple[Profile, torch.nn.Module]:
    config: PretrainedConfig = MODELS[name]()
    return profile_config(config, torch.bfloat16), build_on_meta(config, torch.bfloat16)


def measure_row(model: str, machine: str, workload: Workload) -> Row:
    profile, meta_model = model_of(model)
    budgets = budgets_of(machine)
    resolved = workload.resolve(profile.max_context, profile.dtype)
    tokens = resolved.batch_size * resolved.max_tokens
    optimum = best_split(price_units(profile, resolved), budgets, tokens, reserves_of(budgets))
    ours = {s: score_devicemap(profile, budgets, resolved, s, optimum) for s in STRATEGIES}
    theirs = {
        s: score_transformers(profile, meta_model, budgets, resolved, s, optimum) for s in TRANSFORMERS_STRATEGIES
    }
    fits = optimum.resident_units == len(price_units(profile, resolved))
    label = f"{resolved.batch_size}×{resolved.max_tokens}"
    whole, chunked = fit_of(profile, budgets, replace(resolved, prefill_chunk=0)), fit_of(profile, budgets, resolved)
    return Row(model, machine, label, fits, optimum.kv_token_capacity, ours, theirs, whole, chunked)


def fit_of(profile: Profile, budgets: dict[str, int], workload: Workload) -> Fit:
    """What devicemap "auto" fits for the workload."""
    try:
        plan = make_plan(profile, budgets, workload, "auto")
    except DoesNotFitError:
        return Fit(None, 0)
    return Fit(plan.sequences_that_fit, len(plan.offloaded()))


def score_devicemap(profile, budgets, workload, strategy, optimum: Optimum) -> Score:
    try:
        plan = make_plan(profile, budgets, workload, strategy, runtime_reserves=reserves_of(budgets))
    except DoesNotFitError:
        return Score(None, 0)
    return score_plan(plan, optimum)


def score_transformers(profile, meta_model, budgets, workload, strategy, optimum: Optimum) -> Score:
    """transformers' map for the strategy, judged by devicemap's ledger for the same workload."""
    placements, split = placements_of(profile, transformers_device_map(meta_model, strategy, budgets))
    reserves = tuple(reserves_of(budgets).items())
    plan = Plan(profile, workload, tuple(budgets.items()), f"transformers {strategy}", placements, (), reserves)
    return score_plan(plan, optimum, split)


def score_plan(plan: Plan, optimum: Optimum, split: int = 0) -> Score:
    spilled = len(plan.offloaded())
    if not optimum.fits:
        return Score(None, spilled, split)
    if math.isinf(optimum.kv_token_capacity):
        return Score(1.0 if math.isinf(plan.kv_token_capacity) else 0.0, spilled, split)
    return Score(plan.kv_token_capacity / optimum.kv_token_capacity, spilled, split)


def time_large_plans() -> dict[str, float]:
    """Seconds for a full plan of each timed model from its config: meta skeleton, profile and plan."""
    budgets = budgets_of("8×80")
    seconds = {}
    for name, config in TIMED_MODELS.items():
        start = time.perf_counter()
        profile = profile_config(config(), torch.bfloat16)
        make_plan(profile, budgets, Workload(1, 4096), "auto", runtime_reserves=reserves_of(budgets))
        seconds[name] = time.perf_counter() - start
    return seconds


def cell(score: Score) -> str:
    if score.ratio is None:
        return "no fit" if score.spilled_blocks == 0 else f"— +{score.spilled_blocks} off"
    text = f"{score.ratio:.2f}"
    if score.spilled_blocks:
        text += f" +{score.spilled_blocks} off"
    if score.split_blocks:
        text += f" {score.split_blocks} split"
    return text


def fit_cell(fit: Fit) -> str:
    if fit.sequences is None:
        return "no fit"
    return f"{fit.sequences:.1f}" + (f" +{fit.spilled_blocks} off" if fit.spilled_blocks else "")


def table(rows: list[Row]) -> Table:
    grid = Table(title="KV batch×tokens that fit ÷ best contiguous split   (+N off: blocks spilled to cpu/disk; "
                       "—: no split computing them on the last GPU fits, so no ratio)")
    for column in ("model", "GPUs GiB", "batch×tokens", "GPUs hold all"):
        grid.add_column(column)
    for strategy in STRATEGIES:
        grid.add_column(f"devicemap {strategy}", justify="right")
    for strategy in TRANSFORMERS_STRATEGIES:
        grid.add_column(f"transformers {strategy}", justify="right")
    grid.add_column("auto: sequences fit, prefill whole → in chunks", justify="right")
    for row in rows:
        grid.add_row(
            row.model, row.machine, row.workload, "yes" if row.fits_on_gpus else "no",
            *(cell(row.devicemap[s]) for s in STRATEGIES),
            *(cell(row.transformers[s]) for s in TRANSFORMERS_STRATEGIES),
            f"{fit_cell(row.whole_prefill)} → {fit_cell(row.chunked_prefill)}",
        )  # fmt: skip
    return grid


def misses(rows: list[Row], seconds: dict[str, float]) -> list[str]:
    """Every target the run did not meet, in words."""
    found = []
    for row in rows:
        where = f"{row.model} on {row.machine} at {row.workload}"
        for strategy in ("auto", "balanced"):
            ratio = row.devicemap[strategy].ratio
            if row.best_kv_tokens > 0 and (ratio is None or ratio < TARGET_RATIO):
                found.append(f"{where}: devicemap {strategy} reaches {ratio} of the best")
        for strategy, score in row.devicemap.items():
            if row.fits_on_gpus and score.spilled_blocks:
                found.append(f"{where}: devicemap {strategy} spills {score.spilled_blocks} blocks")
    found += [f"{name} planned in {s:.2f} s" for name, s in seconds.items() if s >= TARGET_SECONDS]
    return found


def main(argv: list[str]) -> int:
    """Run the grid, print the table and the targets, write the JSON; 1 if a target is missed."""
    options = argparse.ArgumentParser(prog="python -m benchmarks.plan_quality", description=__doc__.split("\n")[0])
    options.add_argument("--quick", action="store_true", help="two models, two machines, one workload")
    quick = options.parse_args(argv).quick
    models = list(MODELS)[:2] if quick else list(MODELS)
    machines = list(MACHINES)[:2] if quick else list(MACHINES)
    workloads = WORKLOADS[:1] if quick else WORKLOADS
    rows = [measure_row(m, d, w) for m in models for d in machines for w in workloads]
    seconds = time_large_plans()
    console = Console(width=250)
    console.print(table(rows))
    for name, s in seconds.items():
        console.print(f"{name}: config → meta skeleton → profile → plan over 8×80 GiB + cpu + disk in {s:.2f} s")
    missed = misses(rows, seconds)
    console.print("targets met" if not missed else "targets missed:\n  " + "\n  ".join(missed))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": [asdict(r) for r in rows], "plan_seconds": seconds}, indent=1))
    console.print(f"results written to {RESULTS}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
