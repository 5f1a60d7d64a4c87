"""Files devicemap writes for weights offloaded to disk, in a folder of its own.

devicemap writes weights only when it must: a dtype conversion, or a module that was in
memory. Those tensors go, one block per safetensors file named after the block, into a
fresh folder inside the caller's offload folder, named ``.devicemap-*.partial`` until complete and
``devicemap-*`` after; they are then memory-mapped like any checkpoint. The folder goes
away with the model that reads it (or at exit). A process that is killed cannot remove
its folder, so each folder records its owner, and the next process to write into the
offload folder first reclaims the folders whose owners are gone. Nothing else in the
offload folder is ever written, renamed or removed.
"""

import errno
import os
import re
import shutil
import stat
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import DeviceMapError
from ..units import format_size
from .owner import RECORD_NAME, Owner, is_gone, read_owner, write_owner
from .safetensors_file import Produced, TensorSpec, file_bytes, write_safetensors

# Names OffloadFiles gives its folders (tempfile.mkdtemp's random part between the affixes).
_FOLDER_NAME = re.compile(r"\.devicemap-[a-z0-9_]+\.partial|devicemap-[a-z0-9_]+")
# Out of space, or out of the user's quota on it.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OffloadFiles:
    """A folder of devicemap's own under ``parent`` (the system temp folder when ``None``), made on first write.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as parent:
    ...     files = OffloadFiles(parent)
    ...     mapped = files.write_block("head", [("weight", torch.float32, (2, 2))], lambda name: torch.ones(2, 2))
    ...     files.commit(mapped["weight"]).name.startswith("devicemap-")
    True
    """

    def __init__(self, parent: str | Path | None):
        self.parent = offload_parent(parent)
        self.folder: Path | None = None
        self._created_parents: list[Path] = []
        self._files = 0
        self._needed_bytes = 0
        self._expected = (0, 0)  # blocks and bytes the whole load will write, once told
        self._lock = threading.Lock()

    def expect(self, specs_per_block: Sequence[Sequence[TensorSpec]]) -> None:
        """Say what every block of this load will write, so that a full disk can say how much was needed.

        >>> files = OffloadFiles(None)
        >>> files.expect([[("w", torch.float32, (2, 2))], [("b", torch.float32, (2,))]])
        >>> files.needed()
        (2, 216)
        """
        self._expected = (len(specs_per_block), sum(file_bytes(specs) for specs in specs_per_block))

    def needed(self) -> tuple[int, int]:
        """Blocks and bytes this load writes: as told by ``expect``, or else as many as were begun."""
        return max(self._expected[0], self._files), max(self._expected[1], self._needed_bytes)

    def write_block(
        self, block: str, specs: Sequence[TensorSpec], produce: Callable[[str], Produced]
    ) -> dict[str, torch.Tensor]:
        """Write block ``block``'s tensors, made one at a time by ``produce(name)``, and map them back.

        ``specs`` and ``produce`` are as for ``write_safetensors``. Returns the tensors as
        CPU views of the new file: nothing of them stays in process memory. Threads may
        write different blocks at once.
        """
        with self._lock:
            self._files += 1
            self._needed_bytes += file_bytes(specs)
            path = self._folder() / f"block-{block}.safetensors"
        try:
            write_safetensors(path, specs, produce)
        except OSError as error:
            if error.errno not in _DISK_FULL:
                raise
            raise self._disk_full_error(error) from None
        with safe_open(str(path), framework="pt") as mapped:
            return {name: mapped.get_tensor(name) for name, _, _ in specs}

    def commit(self, owner: object) -> Path | None:
        """Give the folder its final name; it is removed when ``owner`` is garbage-collected or at exit."""
        if self.folder is None:
            return None
        final = self.folder.with_name(self.folder.name.removeprefix(".").removesuffix(".partial"))
        self.folder.rename(final)
        self.folder = final
        weakref.finalize(owner, shutil.rmtree, str(final), True)
        return final

    def discard(self) -> None:
        """Remove everything this object created: its folder, and offload folders it had to make."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        for created in self._created_parents:
            if created.is_dir() and not any(created.iterdir()):
                created.rmdir()
        self._created_parents.clear()

    def _folder(self) -> Path:
        if self.folder is not None:
            return self.folder
        # Deepest first: removed in this order, each folder is empty by its turn.
        self._created_parents = [path for path in (self.parent, *self.parent.parents) if not path.exists()]
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(self.parent)
            self.folder = Path(tempfile.mkdtemp(prefix=".devicemap-", suffix=".partial", dir=self.parent))
            write_owner(self.folder)
        except OSError as error:
            if error.errno in _DISK_FULL:
                raise self._disk_full_error(error) from None
            raise DeviceMapError(
                f"cannot write offloaded weights into {self.parent} ({error.strerror}); pass an "
                "offload_folder on a disk this process can write"
            ) from None
        return self.folder

    def _disk_full_error(self, error: OSError) -> DeviceMapError:
        written_bytes = _bytes_in(self.folder) if self.folder is not None else 0
        blocks, needed_bytes = self.needed()
        return DeviceMapError(
            f"the disk holding offload folder {self.parent} filled up ({error.strerror}) after "
            f"{format_size(written_bytes)} of offloaded weights were written into {self.folder or self.parent}; "
            f"the {blocks} disk block(s) of this load need {format_size(needed_bytes)}: free at least "
            f"{format_size(needed_bytes - written_bytes)} more on that disk, pass offload_folder on a disk "
            "with more room, or lower the disk budget (max_memory={..., 'disk': ...})"
        )


@dataclass(frozen=True)
class StaleFolder:
    """An offload folder of devicemap's whose owning process is gone, and the bytes it holds."""

    path: Path
    size_bytes: int
    owner: Owner


def offload_parent(offload_folder: str | os.PathLike | None) -> Path:
    """Where offload folders go for ``offload_folder``: the folder given, else the system temp folder.

    >>> offload_parent("~/offload") == Path.home() / "offload"
    True
    """
    return Path(offload_folder).expanduser() if offload_folder is not None else Path(tempfile.gettempdir())


def stale_folders(offload_folder: str | os.PathLike | None = None) -> list[StaleFolder]:
    """devicemap's folders in ``offload_folder`` (default: the system temp folder) whose owners are gone.

    Only folders named as devicemap names them and holding devicemap's owner record count;
    a folder of a live process, or with no readable record, never does.

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     stale_folders(folder)
    []
    """
    parent = offload_parent(offload_folder)
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    stale = []
    for path in entries:
        if not _FOLDER_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_dir():
            continue
        owner = read_owner(path)
        if owner is not None and is_gone(owner):
            stale.append(StaleFolder(path, _bytes_in(path), owner))
    return stale


def remove_stale(offload_folder: str | os.PathLike | None = None) -> list[StaleFolder]:
    """Remove the folders ``stale_folders(offload_folder)`` finds; returns those that are gone now.

    A folder another process is removing at the same time counts as removed; one that
    cannot be removed (permissions) is left as it is and not returned.

    >>> with tempfile.TemporaryDirectory() as folder:
    ...     remove_stale(folder)
    []
    """
    removed = []
    for stale in stale_folders(offload_folder):
        try:
            _remove(stale.path)
        except OSError:
            pass  # another process removing it too, or no permission: whether it still exists says which
        if not stale.path.exists():
            removed.append(stale)
    return removed


def _remove(folder: Path) -> None:
    """Remove ``folder``, its owner record last, so that a removal cut short is found stale again."""
    for entry in folder.iterdir():
        if entry.name == RECORD_NAME:
            continue
        if not entry.is_symlink() and entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (folder / RECORD_NAME).unlink()
    folder.rmdir()


def _bytes_in(folder: Path) -> int:
    """The bytes of the regular files under ``folder``, not following links."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += info.st_size if stat.S_ISREG(info.st_mode) else 0
    return total

