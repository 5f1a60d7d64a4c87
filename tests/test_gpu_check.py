"""The GPU check's runner: what it runs, how it judges, its time limits, and a machine without CUDA."""

import json
import sys
import time

import pytest
import torch
from rich.console import Console

from benchmarks.__main__ import run_suite
from benchmarks.gpu import BUDGET_S, Check, Outcome, checks, exit_status, judge_measure, judge_tests, run_check, table

PYTHON = sys.executable


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the check would run")
def test_without_cuda_the_gpu_check_says_so_and_exits_0_having_checked_nothing(capsys):
    assert run_suite("gpu", []) == 0
    assert capsys.readouterr().out.strip() == (
        "no CUDA device on this machine: the GPU check needs one, so it checked nothing"
    )


def test_the_full_run_tests_measures_then_tests_again_under_the_cuda_sanitizer_within_ten_minutes():
    every = checks(quick=False, demo_model="/models/demo")
    assert [check.name for check in every] == ["gpu tests", "demo bf16", "memory", "streaming", "gpu tests, sanitizer"]
    tests, sanitized = every[0], every[-1]
    assert tests.command[1:5] == ("-m", "pytest", "-m", "gpu") and sanitized.command == tests.command
    assert dict(sanitized.environment) == {"TORCH_CUDA_SANITIZER": "1"} and not tests.environment
    assert all("--demo-model" in check.command for check in every[1:4])
    assert BUDGET_S <= 600 and all(check.limit_s <= BUDGET_S for check in every)
    assert [check.name for check in checks(quick=True, demo_model=None)] == ["gpu tests", "demo bf16"]


def test_a_check_passes_on_the_verdict_its_process_prints():
    verdict = json.dumps({"name": "m", "passed": True, "figure": "0.9 of planned", "seconds": 0})
    printed = f"print({'RESULT ' + verdict!r})"
    outcome = run_check(Check("measured", 30, (PYTHON, "-c", printed), judge_measure), time.monotonic() + 60)
    assert (outcome.passed, outcome.figure) == (True, "0.9 of planned") and outcome.seconds > 0


def test_a_check_that_dies_fails_with_the_last_line_it_wrote():
    crash = "import sys; print('loading', flush=True); sys.exit('CUDA error: an illegal memory access was encountered')"
    outcome = run_check(Check("measured", 30, (PYTHON, "-c", crash), judge_measure), time.monotonic() + 60)
    assert (outcome.passed, outcome.figure) == (False, "loading")
    assert judge_measure(1, "CUDA error: an illegal memory access was encountered") == (
        False, "CUDA error: an illegal memory access was encountered")  # fmt: skip


def test_a_check_that_runs_past_its_limit_or_the_runs_end_fails_saying_so():
    sleeper = Check("slow", 0.5, (PYTHON, "-c", "import time; time.sleep(30)"), judge_measure)
    outcome = run_check(sleeper, time.monotonic() + 60)
    assert (outcome.passed, outcome.figure) == (False, "ran past its 0 s") and outcome.seconds < 10
    late = run_check(Check("late", 30, (PYTHON, "-c", "pass"), judge_measure), time.monotonic() - 1)
    assert (late.passed, late.figure) == (False, f"not run: the {BUDGET_S} s of the run were spent")


def test_a_test_run_passes_only_when_it_passed_tests_and_failed_none():
    assert judge_tests(0, "9 passed, 3 skipped in 40.0s") == (True, "9 passed, 3 skipped in 40.0s")
    assert judge_tests(1, "1 failed, 8 passed in 40.0s")[0] is False
    assert judge_tests(5, "12 deselected in 3.0s")[0] is False


def test_one_failed_check_fails_the_run_and_the_table_says_which():
    outcomes = [Outcome("memory", True, "cuda:0 used 3.1 GiB of 3.4 GiB planned", 40),
                Outcome("streaming", False, "12.0 tokens/s = 0.31 × the H2D bound 38.7", 50)]  # fmt: skip
    assert exit_status(outcomes) == 1 and exit_status(outcomes[:1]) == 0
    console = Console(width=200, record=True)
    console.print(table(outcomes))
    lines = console.export_text().splitlines()
    assert any("streaming" in line and "FAIL" in line and "0.31" in line for line in lines)
    assert any("memory" in line and "pass" in line for line in lines)
