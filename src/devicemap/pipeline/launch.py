"""Start a pipeline's ranks on this machine, talk to them, and never leave one behind.

The launcher does what torchrun's agent does for one machine: it hosts the rendezvous
store on a port it binds itself (127.0.0.1 by default, so nothing listens beyond this
machine, and no other program can take the port between choosing and binding it), and
starts one worker process per rank with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT`` set, gloo and NCCL bound to the same interface. Requests and
answers travel as JSON lines on a pair of pipes per rank.

Faults: the launcher watches every worker while it waits. When one reports an error or
exits, the others stop on their own within seconds (their peers vanish, or their waits
time out); after a short grace the launcher kills what is left, reaps every process, and
raises one ``PipelineError`` that names the rank that failed first and why. Workers watch
the launcher too and exit if it dies.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta

import psutil
import torch.distributed as dist

from ..errors import PipelineError
from .schedule import Request
from .worker import WorkerSpec

_POLL_S = 0.1
_GRACE_S = 3.0  # how long the other ranks get to stop and report after the first failure


@dataclass
class _Rank:
    """The launcher's view of one worker process."""

    rank: int
    process: subprocess.Popen
    control: object
    reply_fd: int
    buffer: bytes = b""
    messages: list = field(default_factory=list)


@dataclass(frozen=True)
class _Failure:
    """What one rank said or did when the pipeline failed, and when."""

    rank: int
    at: float
    kind: str  # "cause", "peer", "died", "hung"
    message: str


class Workers:
    """N worker processes on this machine, one per rank, serving requests until closed."""

    def __init__(self, spec: WorkerSpec, master_addr: str = "127.0.0.1"):
        self.spec = spec
        self._stopped: str | None = None
        env_without_port = _worker_environment(spec, master_addr)
        listener = socket.create_server((master_addr, 0))
        port = listener.getsockname()[1]
        # The store takes the listening socket over and closes it when the store goes.
        self._store = dist.TCPStore(
            master_addr, port, None, True, timeout=timedelta(seconds=spec.timeout_s),
            wait_for_workers=False, master_listen_fd=listener.detach(),
        )  # fmt: skip
        self._ranks: list[_Rank] = []
        self._finalizer = weakref.finalize(self, _kill_and_reap, self._ranks, os.getpid())
        env = {**env_without_port, "MASTER_PORT": str(port)}
        for rank in range(spec.stages):
            self._ranks.append(self._start(rank, spec, env))

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(rank.process.pid for rank in self._ranks)

    def _start(self, rank: int, spec: WorkerSpec, env: dict[str, str]) -> _Rank:
        control_read, control_write = os.pipe()
        reply_read, reply_write = os.pipe()
        command = [
            sys.executable, "-m", "devicemap.pipeline", "--spec", spec.to_json(),
            "--control-fd", str(control_read), "--reply-fd", str(reply_write), "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        process = subprocess.Popen(
            command,
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            pass_fds=(control_read, reply_write),
            start_new_session=True,  # a Ctrl-C reaches the launcher, which stops the workers itself
        )
        os.close(control_read)
        os.close(reply_write)
        return _Rank(rank, process, os.fdopen(control_write, "w"), reply_read)

    def wait_ready(self) -> None:
        """Wait until every rank has joined and loaded its stage."""
        self._collect("ready", timeout_s=None)

    def generate(self, request: Request) -> list[list[int]]:
        """Send one request to every rank; rank 0's new tokens come back."""
        if self._stopped is not None:
            raise PipelineError(f"this pipeline has stopped ({self._stopped}); start a new one")
        line = json.dumps({"op": "generate", "request": request.to_json()})
        if not all([self._write(rank, line) for rank in self._ranks]):
            self._fail()
        answers = self._collect("done", timeout_s=self.spec.timeout_s)
        return answers[0]["tokens"]

    def close(self) -> None:
        """Ask every rank to leave, then make sure each process is gone and reaped."""
        for rank in self._ranks:
            if rank.process.poll() is None:
                self._write(rank, json.dumps({"op": "close"}))
            _close_quietly(rank.control)
        deadline = time.monotonic() + _GRACE_S
        for rank in self._ranks:
            try:
                rank.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._shutdown("it was closed")

    def _shutdown(self, reason: str) -> None:
        self._stopped = self._stopped or reason
        self._finalizer()
        for rank in self._ranks:
            if rank.reply_fd >= 0:
                os.close(rank.reply_fd)
                rank.reply_fd = -1
        self._store = None

    def _write(self, rank: _Rank, line: str) -> bool:
        """Whether the line reached the rank's pipe (False when the rank has gone)."""
        try:
            rank.control.write(line + "\n")
            rank.control.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def _collect(self, kind: str, timeout_s: float | None) -> dict[int, dict]:
        """Every rank's next ``kind`` message; raises PipelineError the moment anything fails.

        Once one rank has answered, the others must answer within ``timeout_s``: a rank
        that does not is hung even if no peer waits on it.
        """
        answers: dict[int, dict] = {}
        first_answer = None
        try:
            while len(answers) < len(self._ranks):
                arrived = self._poll()
                if any("error" in message for _, message in arrived):
                    self._fail(arrived)
                for rank, message in arrived:
                    answers[rank] = message[kind]
                    first_answer = first_answer or time.monotonic()
                if any(r.rank not in answers and r.process.poll() is not None for r in self._ranks):
                    self._fail(arrived)
                if timeout_s is not None and first_answer and time.monotonic() - first_answer > timeout_s:
                    self._fail(arrived)
        except KeyboardInterrupt:
            self._shutdown("it was interrupted")
            raise
        return answers

    def _poll(self, timeout_s: float = _POLL_S) -> list[tuple[int, dict]]:
        """Messages that arrived within ``timeout_s``, as (rank, message)."""
        open_ranks = {rank.reply_fd: rank for rank in self._ranks if rank.reply_fd >= 0}
        readable, _, _ = select.select(list(open_ranks), [], [], timeout_s)
        arrived = []
        for fd in readable:
            rank = open_ranks[fd]
            data = os.read(fd, 1 << 20)
            if not data:
                os.close(fd)
                rank.reply_fd = -1
                continue
            rank.buffer += data
            *lines, rank.buffer = rank.buffer.split(b"\n")
            arrived += [(rank.rank, json.loads(line)) for line in lines if line.strip()]
        return arrived

    def _fail(self, arrived: list[tuple[int, dict]] = ()) -> None:
        """Let the other ranks stop and report, kill what is left, reap all, and raise."""
        for rank in self._ranks:
            _close_quietly(rank.control)  # a rank waiting for requests sees the end of its pipe and leaves
        failures: dict[int, _Failure] = {}
        deadline = time.monotonic() + _GRACE_S
        while True:
            for rank, message in arrived:
                if "error" in message and rank not in failures:
                    error = message["error"]
                    failures[rank] = _Failure(rank, time.monotonic(), error["kind"], error["message"])
            finished = [rank for rank in self._ranks if rank.process.poll() is not None and rank.reply_fd < 0]
            for rank in finished:
                if rank.rank not in failures:
                    failures[rank.rank] = _exit_failure(rank)
            if len(finished) == len(self._ranks) or time.monotonic() > deadline:
                break
            arrived = self._poll()
        for rank in self._ranks:
            if rank.rank not in failures and rank.process.poll() is None:
                failures[rank.rank] = _Failure(rank.rank, time.monotonic(), "hung", "was still running and was killed")
            elif rank.rank not in failures:
                failures[rank.rank] = _exit_failure(rank)
        message = _diagnose(failures, self.spec.timeout_s)
        self._shutdown(message)
        raise PipelineError(message)


def _worker_environment(spec: WorkerSpec, master_addr: str) -> dict[str, str]:
    interface = interface_of(master_addr)
    env = {
        **os.environ,
        "WORLD_SIZE": str(spec.stages),
        "LOCAL_WORLD_SIZE": str(spec.stages),
        "MASTER_ADDR": master_addr,
        # the launcher hosts the store, as torchrun's agent does; every rank joins as a client
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        # NCCL bootstraps its ranks over sockets too; without this it listens on every interface.
        "GLOO_SOCKET_IFNAME": interface,
        "NCCL_SOCKET_IFNAME": interface,
    }
    if spec.threads:
        env["OMP_NUM_THREADS"] = str(spec.threads)
    return env


def interface_of(address: str) -> str:
    """The network interface that holds ``address``, so gloo listens there and nowhere else.

    >>> interface_of("127.0.0.1")
    'lo'
    """
    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address == address for entry in addresses):
            return name
    raise PipelineError(
        f"master address {address!r} belongs to no network interface of this machine; the launcher runs "
        "every rank here, so use 127.0.0.1 (the default) or one of this machine's addresses"
    )


def _close_quietly(pipe) -> None:
    try:
        pipe.close()
    except BrokenPipeError:
        pass  # the rank has gone already; it is reaped with the others


def _exit_failure(rank: _Rank) -> _Failure:
    code = rank.process.returncode
    if code == 0:
        return _Failure(rank.rank, time.monotonic(), "stopped", "left when the launcher closed its pipe")
    if code < 0:
        return _Failure(rank.rank, time.monotonic(), "died", f"killed by signal {signal.Signals(-code).name}")
    return _Failure(rank.rank, time.monotonic(), "died", f"exited with code {code} without reporting an error")


def _diagnose(failures: dict[int, _Failure], timeout_s: float) -> str:
    """Name the rank that failed first and why, then what each other rank said."""
    by_cause = sorted(failures.values(), key=lambda failure: (_SEVERITY[failure.kind], failure.at))
    if not by_cause:
        return "the pipeline failed, but no rank reported why"
    root = by_cause[0]
    if root.kind == "hung":
        waiting = sorted(f.rank for f in failures.values() if f.kind == "peer")
        headline = (
            f"rank {root.rank} stopped answering for more than the {timeout_s:g} s timeout"
            + (f" (ranks {', '.join(map(str, waiting))} gave up waiting)" if waiting else "")
            + " and was killed"
        )
    elif root.kind == "died":
        headline = f"rank {root.rank} died: {root.message}"
    else:
        headline = f"rank {root.rank} failed: {root.message}"
    others = [
        failure.message if failure.kind == "peer" else f"rank {failure.rank}: {failure.message}"
        for failure in sorted(failures.values(), key=lambda failure: failure.rank)
        if failure is not root
    ]
    return f"pipeline stopped: {headline}" + (f". Then {'; '.join(others)}." if others else "")


_SEVERITY = {"cause": 0, "died": 1, "hung": 2, "peer": 3, "stopped": 4}


def _kill_and_reap(ranks: list[_Rank], launcher_pid: int) -> None:
    """Kill every worker still running and wait for each, so none is left as a zombie.

    Only the launcher does: a process forked from it inherits this cleanup, not the workers.
    """
    if os.getpid() != launcher_pid:
        return
    for rank in ranks:
        if rank.process.poll() is None:
            rank.process.kill()
    for rank in ranks:
        rank.process.wait()
