"""One entry for every benchmark suite.

    python -m benchmarks                  every suite
    python -m benchmarks speed [OPTIONS]  one suite (speed, plan, pipeline, gpu), with its own options
    python -m benchmarks speed plan --quick

Each suite is a module of this package with ``main(argv: list[str]) -> int``; the
options after the suite names go to every suite named, and every suite takes
``--quick`` for a short smoke run.
"""

import importlib
import sys

SUITES = {
    "speed": "benchmarks.speed",
    "plan": "benchmarks.plan_quality",
    "pipeline": "benchmarks.pipeline_bench",
    "gpu": "benchmarks.gpu",
}


def main(argv: list[str]) -> int:
    """Run the suites named at the start of ``argv`` (all when none are), passing them the rest.

    >>> main(["speed", "--quick"])  # doctest: +SKIP
    0
    """
    names = [argument for argument in argv if argument in SUITES]
    options = [argument for argument in argv if argument not in SUITES]
    if options[:1] in (["-h"], ["--help"]) and not names:
        print(__doc__)
        return 0
    status = 0
    for name in names or list(SUITES):
        print(f"== {name} ==", flush=True)
        status = max(status, run_suite(name, options))
    return status


def run_suite(name: str, options: list[str]) -> int:
    """Import suite ``name`` and run it; a suite not written yet is reported and skipped."""
    try:
        suite = importlib.import_module(SUITES[name])
    except ModuleNotFoundError as missing:
        if missing.name != SUITES[name]:
            raise
        print(f"suite {name!r} skipped: {SUITES[name]} does not exist", flush=True)
        return 0
    try:
        return suite.main(options) or 0
    except SystemExit as stop:
        # argparse exits on --help or an option the suite does not take; the other suites still run.
        return stop.code if isinstance(stop.code, int) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
