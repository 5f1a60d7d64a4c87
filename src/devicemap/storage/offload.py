"""Files devicemap writes for weights offloaded to disk, in a folder of its own.

devicemap writes weights only when it must: a dtype conversion, or a module that was in
memory. Those tensors go, one block per safetensors file named after the block, into a
fresh folder inside the caller's offload folder, named ``.devicemap-*.partial`` until
complete and ``devicemap-*`` after; they are then memory-mapped like any checkpoint.
The folder goes away with the model that reads it (or at exit), and nothing else in the
offload folder is ever written, renamed or removed.
"""

import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import DeviceMapError
from .safetensors_file import Produced, TensorSpec, write_safetensors


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
        self.parent = Path(parent).expanduser() if parent is not None else Path(tempfile.gettempdir())
        self.folder: Path | None = None
        self._created_parents: list[Path] = []
        self._lock = threading.Lock()

    def write_block(
        self, block: str, specs: Sequence[TensorSpec], produce: Callable[[str], Produced]
    ) -> dict[str, torch.Tensor]:
        """Write block ``block``'s tensors, made one at a time by ``produce(name)``, and map them back.

        ``specs`` and ``produce`` are as for ``write_safetensors``. Returns the tensors as
        CPU views of the new file: nothing of them stays in process memory. Threads may
        write different blocks at once.
        """
        with self._lock:
            path = self._folder() / f"block-{block}.safetensors"
        write_safetensors(path, specs, produce)
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
            self.folder = Path(tempfile.mkdtemp(prefix=".devicemap-", suffix=".partial", dir=self.parent))
        except OSError as error:
            raise DeviceMapError(
                f"cannot write offloaded weights into {self.parent} ({error.strerror}); pass an "
                "offload_folder on a disk this process can write"
            ) from None
        return self.folder
