"""The speed suite: devicemap against transformers' ``device_map``, side by side, in one run.

    python -m benchmarks speed [--quick] [--runs N] [--only TEXT] [--demo-model PATH]

Each case runs in a fresh process, every run of every case in turn (so that a
noisy neighbour slows both systems alike). The table shows the best run and the
median; ratios are devicemap ÷ transformers and devicemap ÷ a physical reference,
from the best runs, beside issue 4's targets. A second table (``--only cold``, Linux,
not with --quick) measures disk offload of the 1.1B model made cold before every
decode step against max(compute, disk read). Results go to benchmarks/results/.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, replace
from datetime import datetime
from importlib import metadata
from pathlib import Path

import torch
from rich.console import Console

from .speed_cases import (
    CPU_BUDGET_BYTES,
    QUICK,
    Case,
    Settings,
    SuiteModels,
    cold_cases,
    comparisons,
    cpu_cases,
    gpu_cases,
)
from .speed_checkpoints import (
    BenchModel,
    cache_folder,
    demo_models,
    demo_source,
    layer_bytes,
    layer_count,
    read_every_byte,
    tinyllama_model,
)
from .speed_cold import cold_rows, cold_table
from .speed_report import CaseResult, failures, report, rows_for, summary_line, table, write_json
from .speed_worker import RESULT_PREFIX

REPOSITORY = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
# Quiet, offline workers: their stderr is kept only to explain a failure.
_WORKER_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


class CaseFailed(Exception):
    """A worker process ended without a result."""


def main(argv: list[str] | None = None) -> int:
    """Run the speed suite with command-line options ``argv``; 0 when it ran, whatever the verdicts.

    >>> main(["--quick"])  # doctest: +SKIP
    """
    arguments = parse_arguments(argv)
    # Piped output (a log, CI) gets a table wide enough to read, not 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 180)
    settings = settings_from(arguments)
    warn_if_busy(settings, console)
    models = prepare_models(arguments, settings, console)
    cases = select(suite_cases(models, console), arguments.only)
    results = run_cases(cases, settings, console)
    rows = rows_for(comparisons(cases), results)
    cold = cold_rows(results)
    if rows:
        console.print(table(rows))
    if cold:
        console.print(cold_table(cold))
    for line in failures(results):
        console.print(f"[red]failed[/red] {line}", highlight=False)
    console.print(summary_line([*rows, *cold]))
    data = {**report(settings, environment(), results, rows), "cold_rows": [asdict(row) for row in cold]}
    path = write_json(data, arguments.results, datetime.now())
    console.print(f"results: {path}")
    return 0


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="one run, 8 new tokens, a 64-token prefill, no 1.1B checkpoint: a smoke test")
    parser.add_argument("--runs", type=int, help="fresh processes per case (default 3)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per decode (default 64)")
    parser.add_argument("--prefill-tokens", type=int, help="prompt length for time to first token (default 512)")
    parser.add_argument("--threads", type=int, help="torch threads in every worker (default: torch's own)")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only cases whose key (system/model/placement) contains TEXT; repeatable")
    parser.add_argument("--demo-model", metavar="PATH",
                        help="use this model folder as the demo model instead of devicemap's cached one")
    parser.add_argument("--results", type=Path, default=RESULTS, metavar="DIR", help="where to write the JSON")
    return parser.parse_args(argv)


def settings_from(arguments: argparse.Namespace) -> Settings:
    """The settings the options ask for, on top of the defaults or --quick's."""
    settings = QUICK if arguments.quick else Settings()
    overrides = {"runs": arguments.runs, "new_tokens": arguments.new_tokens,
                 "prefill_tokens": arguments.prefill_tokens, "threads": arguments.threads}
    return replace(settings, **{name: value for name, value in overrides.items() if value is not None})


def warn_if_busy(settings: Settings, console: Console) -> None:
    """Say so when other work already loads the cores: torch's threads then wait on each other."""
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    if settings.threads is None and load > cores / 2:
        console.print(f"[yellow]the machine is busy (load average {load:.1f} on {cores} cores): torch's "
                      f"{torch.get_num_threads()} threads per worker will wait on each other and the figures "
                      "will scatter; --threads 1 steadies them[/yellow]")


def prepare_models(arguments: argparse.Namespace, settings: Settings, console: Console) -> SuiteModels:
    """Make (once) and warm every checkpoint the run needs; plan the 1.1B's 1 GB map."""
    cache = cache_folder()
    with console.status(f"preparing checkpoints in {cache}"):
        demo_fp32, demo_bf16 = demo_models(demo_source(arguments.demo_model), cache)
        tinyllama = None if arguments.quick else tinyllama_model(cache)
        for model in (demo_fp32, demo_bf16, tinyllama):
            if model is not None:
                read_every_byte(model.folder)
    budget_map = cpu_budget_map(tinyllama, settings) if tinyllama is not None else None
    return SuiteModels(demo_fp32, demo_bf16, tinyllama, budget_map)


def cpu_budget_map(model: BenchModel, settings: Settings) -> dict:
    """devicemap's plan for ``model`` in a 1 GB CPU budget; both systems then load this one map."""
    import devicemap

    workload = devicemap.Workload(batch_size=1, max_tokens=settings.prefill_tokens + settings.new_tokens)
    placement = devicemap.plan(str(model.folder), dtype=torch.bfloat16, max_memory={"cpu": CPU_BUDGET_BYTES},
                               workload=workload)
    return dict(placement.device_map)


def suite_cases(models: SuiteModels, console: Console) -> list[Case]:
    """Every case of the run; the cold ones only on Linux, the GPU ones only where CUDA is available."""
    checkpoints = [model for model in (models.demo_fp32, models.demo_bf16, models.tinyllama) if model is not None]
    counts = {model.name: layer_count(model) for model in checkpoints}
    cases = cpu_cases(models, counts)
    if models.tinyllama is not None and sys.platform.startswith("linux"):
        # Dropping a process's pages needs /proc/self/maps; counting its disk reads, /proc/self/io.
        cases += cold_cases(models.tinyllama, counts[models.tinyllama.name])
    if not torch.cuda.is_available():
        console.print("[yellow]GPU cases skipped: CUDA is not available on this machine[/yellow]")
        return cases
    streamed = models.tinyllama or models.demo_bf16
    first_offloaded = counts[streamed.name] // 2
    return cases + gpu_cases(streamed, counts[streamed.name], layer_bytes(streamed, first_offloaded))


def select(cases: list[Case], patterns: list[str]) -> list[Case]:
    """The cases whose key contains any of ``patterns`` (all of them when none are given).

    >>> [case.key for case in select(cases, ["half-disk"])]  # doctest: +SKIP
    ['devicemap/demo-fp32/half-disk', 'transformers/demo-fp32/half-disk', ...]
    """
    return [case for case in cases if not patterns or any(pattern in case.key for pattern in patterns)]


def run_cases(cases: list[Case], settings: Settings, console: Console) -> dict[str, CaseResult]:
    """Run every case ``settings.runs`` times, round-robin; a case that fails once is not retried."""
    runs: dict[str, list[dict]] = {case.key: [] for case in cases}
    errors: dict[str, str] = {}
    for number in range(1, settings.runs + 1):
        for case in cases:
            if case.key in errors:
                continue
            try:
                runs[case.key].append(run_once(case, settings))
                outcome = _brief(runs[case.key][-1])
            except CaseFailed as failure:
                errors[case.key] = str(failure)
                outcome = f"[red]failed: {failure}[/red]"
            console.print(f"run {number}/{settings.runs}  {case.key:<48} {outcome}", highlight=False)
    return {case.key: CaseResult(case, tuple(runs[case.key]), errors.get(case.key)) for case in cases}


def run_once(case: Case, settings: Settings) -> dict:
    """One run of ``case`` in a fresh Python process; its figures."""
    spec = json.dumps({"case": asdict(case), "settings": asdict(settings)})
    command = [sys.executable, "-m", "benchmarks.speed_worker", spec]
    try:
        finished = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True,
                                  timeout=settings.timeout_s, env={**os.environ, **_WORKER_ENVIRONMENT})
    except subprocess.TimeoutExpired as expired:
        raise CaseFailed(f"no result within {settings.timeout_s:.0f} s") from expired
    lines = [line for line in finished.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if finished.returncode != 0 or not lines:
        raise CaseFailed(_last_line(finished.stderr) or f"worker exited with status {finished.returncode}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def environment() -> dict:
    """What the figures depend on: versions, the commit, CPU and GPU, the load on the machine."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in ("torch", "transformers", "accelerate", "safetensors", "devicemap")},
        "commit": _commit(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _brief(figures: dict) -> str:
    shown = {"load_s": "load {:.2f} s", "decode_s": "decode {:.2f} s", "prefill_s": "prefill {:.2f} s",
             "read_s": "read {:.2f} s", "fill_s": "fill {:.2f} s", "h2d_bytes_per_s": "H2D {:.3g} B/s"}
    return "  ".join(text.format(figures[name]) for name, text in shown.items() if name in figures)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    finished = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPOSITORY, capture_output=True, text=True)
    return finished.stdout.strip() or None
