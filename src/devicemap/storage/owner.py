"""Which process owns a folder devicemap writes, recorded inside it, and whether that process is gone.

A process killed while it holds a model (the OOM killer, a second Ctrl-C) never removes
its offload folder. The record lets a later process prove the owner gone and reclaim the
folder: a process id alone is not enough, since ids are reused, so the record adds the
process's start time (in clock ticks since boot, exact), the boot and the host. Where the
proof cannot be made — another machine sharing the folder, another pid namespace, a
system without ``/proc`` — the owner counts as alive and the folder is kept.
"""

import json
import os
import socket
import stat
from dataclasses import asdict, dataclass
from pathlib import Path

RECORD_NAME = "owner.json"
# Marks a record as devicemap's: a folder whose record lacks it is someone else's.
_KIND = "devicemap offload folder"
# A record is a few hundred bytes; reading no more keeps a planted large file harmless.
_MAX_RECORD_BYTES = 4096


@dataclass(frozen=True)
class Owner:
    """A process, named so that no other process, before or after a reboot, matches it."""

    host: str
    boot: str
    pid_namespace: str
    pid: int
    started: str


def this_process() -> Owner:
    """The record of the calling process.

    >>> this_process().pid == os.getpid()
    True
    """
    return Owner(socket.gethostname(), _boot(), _pid_namespace(), os.getpid(), _started(os.getpid()) or "")


def write_owner(folder: Path) -> None:
    """Record the calling process as the owner of ``folder``.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_owner(Path(folder))
    ...     read_owner(Path(folder)) == this_process()
    True
    """
    (folder / RECORD_NAME).write_text(json.dumps({"kind": _KIND, **asdict(this_process())}))


def read_owner(folder: Path) -> Owner | None:
    """The owner recorded in ``folder``; ``None`` when it holds no readable record of devicemap's.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     read_owner(Path(folder)) is None
    True
    """
    try:
        fields = json.loads(_read_regular_file(folder / RECORD_NAME))
        if fields.pop("kind") != _KIND:
            return None
        owner = Owner(**fields)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    typed = all(isinstance(value, str) for value in (owner.host, owner.boot, owner.pid_namespace, owner.started))
    return owner if typed and isinstance(owner.pid, int) else None


def is_gone(owner: Owner) -> bool:
    """Whether the process ``owner`` names has ended; ``False`` whenever that cannot be proved here.

    >>> is_gone(this_process())
    False
    """
    here = this_process()
    if not here.boot or owner.host != here.host:
        return False
    if owner.boot != here.boot:
        return True
    if owner.pid_namespace != here.pid_namespace:
        return False
    return _started(owner.pid) != owner.started


def _read_regular_file(path: Path) -> str:
    """The text of ``path``, refusing links, pipes and devices, which could point anywhere or block forever."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise OSError(f"{path} is not a regular file")
        return os.read(descriptor, _MAX_RECORD_BYTES).decode()
    finally:
        os.close(descriptor)


def _boot() -> str:
    """This boot's id (Linux); empty where the system has none, so that no owner is ever judged gone."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _started(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot; ``None`` when no live process has that id."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields that follow it are counted from its end.
    state, *fields = stat_line.rpartition(")")[2].split()
    # A zombie has ended and freed its mappings; only its exit status waits to be collected.
    return None if state in ("Z", "X") else fields[18]
