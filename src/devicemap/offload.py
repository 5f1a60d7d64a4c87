"""Files devicemap writes for weights offloaded to disk, in a folder of its own.

devicemap writes weights only when it must: a dtype conversion, or a module that was in
memory. Those tensors go, one block per safetensors file, into a fresh folder inside the
caller's offload folder, named ``.devicemap-*.partial`` until complete and
``devicemap-*`` after; they are then memory-mapped like any checkpoint. The folder goes
away with the model that reads it (or at exit), and nothing else in the offload folder
is ever written, renamed or removed.
"""

import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import DeviceMapError
from .safetensors_file import encode_header

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


class OffloadFiles:
    """A folder of devicemap's own under ``parent`` (the system temp folder when ``None``), made on first write.

    >>> files = OffloadFiles(Path("offload"))
    >>> tensors = files.write_block("model.layers.3", specs, produce)  # doctest: +SKIP
    >>> files.commit(model)  # doctest: +SKIP
    """

    def __init__(self, parent: str | Path | None):
        self.parent = Path(parent).expanduser() if parent is not None else Path(tempfile.gettempdir())
        self.folder: Path | None = None
        self._created_parents: list[Path] = []
        self._files = 0

    def write_block(
        self, block: str, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Write one block's tensors, made one at a time by ``produce(name)``, and map them back.

        Returns the tensors as CPU views of the new file: nothing of them stays in process memory.
        """
        folder = self._folder()
        path = folder / f"block-{self._files:05d}.safetensors"
        self._files += 1
        write_streamed(path, specs, produce, block)
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


def write_streamed(
    path: Path, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor], block: str = ""
) -> None:
    """Write a safetensors file whose tensors ``specs`` announces, asking ``produce`` for one at a time.

    Only one tensor is in memory at once, however large the block. Wider dtypes come first,
    so every tensor starts at a multiple of its element size and maps without a copy.

    >>> ones = lambda name: torch.ones(2, 2, dtype=torch.bfloat16)
    >>> write_streamed(Path("block.safetensors"), [("w", torch.bfloat16, (2, 2))], ones)
    """
    ordered = sorted(specs, key=lambda spec: -spec[1].itemsize)
    header, _ = encode_header(ordered)
    with path.open("wb") as stream:
        stream.write(header)
        for name, dtype, shape in ordered:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise DeviceMapError(
                    f"block {block!r}: tensor {name!r} came as {tensor.dtype} {list(tensor.shape)} where "
                    f"{dtype} {list(shape)} was announced"
                )
            stream.write(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))

