"""``python -m devicemap.pipeline``: one rank started by devicemap's launcher (see ``worker.main``)."""

from .worker import main

main()
