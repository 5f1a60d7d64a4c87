"""devicemap's benchmark suites, run with ``python -m benchmarks [SUITE ...] [--quick]``."""
