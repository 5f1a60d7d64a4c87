"""Hugging Face model folders: which tensors they hold, where, and lazy access to them.

``open_checkpoint`` reads only headers and the index; tensors come later, one at a
time, as CPU views into a memory mapping of their file, so that reading a checkpoint
costs page cache, not process memory. Every problem with the folder is a
``CheckpointError`` that names the file, the tensor and the numbers.
"""

import difflib
import json
import math
import os
import pickle
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch

from ..errors import CheckpointError
from ..units import first_of
from .safetensors_file import TensorInfo, read_safetensors_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Checkpoint:
    """A model folder's description: its config and every tensor, in file then byte order.

    The description is read from headers only; ``tensor`` and ``tensor_to`` map the data,
    ``read_into`` reads it (see ``open_checkpoint``).
    """

    folder: Path
    config_path: Path
    file_format: str
    tensors: Mapping[str, TensorInfo]
    _reader: "_SafetensorsReader | _PickleReader" = field(repr=False, compare=False)

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(dict.fromkeys(info.file for info in self.tensors.values()))

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: info.shape for name, info in self.tensors.items()}

    def tensor(self, name: str) -> torch.Tensor:
        """Return tensor ``name`` as a CPU tensor backed by its file's mapping, without copying.

        The mapping lives as long as any tensor returned from it. Writes to the tensor
        stay private to this process (copy on write); the file is never modified.
        """
        return self._reader.tensor(self._info(name))

    def tensor_to(
        self, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Return tensor ``name`` on ``device`` at ``dtype`` (``None`` keeps the file's dtype).

        On the CPU at the file's dtype this is the file-backed view itself; otherwise a
        new tensor. A conversion for an accelerator happens there, after the copy,
        because the accelerator converts faster than the host.
        """
        tensor = self.tensor(name)
        if torch.device(device).type != "cpu":
            tensor = tensor.to(device)
        return tensor if dtype is None else tensor.to(dtype)

    def read_into(self, name: str, out: torch.Tensor, start_element: int = 0) -> None:
        """Fill the contiguous CPU tensor ``out`` with tensor ``name``'s elements from ``start_element`` on.

        The elements are converted to ``out``'s dtype. A safetensors file is read with
        ``pread`` through a small buffer of the calling thread, so nothing is mapped:
        reading a mapping costs a page fault per page, which makes a converting load
        slower than the read and the conversion together.
        """
        info = self._info(name)
        flat = out.view(-1)
        if start_element < 0 or start_element + flat.numel() > math.prod(info.shape):
            raise ValueError(
                f"elements {start_element}…{start_element + flat.numel()} are outside tensor {name} of shape "
                f"{list(info.shape)}"
            )
        self._reader.read_into(info, flat, start_element)

    def _info(self, name: str) -> TensorInfo:
        if name in self.tensors:
            return self.tensors[name]
        close = difflib.get_close_matches(name, list(self.tensors), n=3)
        hint = f"; closest names: {', '.join(close)}" if close else ""
        raise CheckpointError(f"checkpoint {self.folder} has no tensor {name!r}{hint}")


def open_checkpoint(folder: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Describe the model folder ``folder`` from its config, index and file headers.

    Pickle checkpoints (``*.bin``, ``*.pt``, ``*.pth``) can run code when read, so they
    are refused unless ``allow_pickle=True``, and then read with
    ``torch.load(weights_only=True, mmap=True)``.

    >>> import tempfile
    >>> from safetensors.torch import save_file
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     save_file({"norm.weight": torch.arange(4.0)}, f"{folder}/model.safetensors")
    ...     _ = Path(folder, "config.json").write_text("{}")
    ...     checkpoint = open_checkpoint(folder)
    ...     checkpoint.tensors["norm.weight"].shape, checkpoint.tensor_to("norm.weight", "cpu", torch.int64)
    ((4,), tensor([0, 1, 2, 3]))
    """
    folder = _require_folder(Path(folder))
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"model folder {folder} has no config.json; a Hugging Face model folder holds config.json "
            "beside its weights: copy it there from where the weights came from"
        )
    safetensors = _find_weight_files(folder, SAFETENSORS_INDEX, (".safetensors",), "model.safetensors")
    if safetensors is not None:
        tensors = _read_safetensors_folder(folder, safetensors)
        return Checkpoint(folder, config_path, "safetensors", MappingProxyType(tensors), _SafetensorsReader())
    pickles = _find_weight_files(folder, PICKLE_INDEX, PICKLE_SUFFIXES, "pytorch_model.bin")
    if pickles is None:
        present = ", ".join(sorted(path.name for path in folder.iterdir())[:10]) or "nothing"
        raise CheckpointError(
            f"model folder {folder} holds no weights (*.safetensors, or {SAFETENSORS_INDEX} and its shards); "
            f"it holds: {present}. Copy the weight files into it"
        )
    if not allow_pickle:
        names = ", ".join(path.name for path in pickles.files)
        raise CheckpointError(
            f"model folder {folder} holds only pickle checkpoints ({names}); reading a pickle can run "
            "arbitrary code, so they are refused. Convert them to safetensors, or if you trust the files "
            "pass allow_pickle=True to read them with torch.load(weights_only=True)"
        )
    reader = _PickleReader()
    tensors = reader.read_folder(folder, pickles)
    return Checkpoint(folder, config_path, "pickle", MappingProxyType(tensors), reader)


def folder_tensors(folder: Path) -> Mapping[str, TensorInfo] | None:
    """The safetensors tensors of a model folder, from headers; ``None`` when it holds no safetensors weights.

    >>> folder_tensors(Path("/")) is None
    True
    """
    if (folder / SAFETENSORS_INDEX).is_file() or any(folder.glob("*.safetensors")):
        return open_checkpoint(folder).tensors
    return None


def _require_folder(folder: Path) -> Path:
    if folder.is_dir():
        return folder.resolve()
    if folder.is_file():
        raise CheckpointError(
            f"model path {folder} is a file, not a folder; pass the folder that holds it and its config.json"
        )
    raise CheckpointError(
        f"model folder {folder} does not exist; pass a folder holding config.json and *.safetensors weights"
    )


@dataclass(frozen=True)
class _WeightFiles:
    """A folder's weight files of one format, and the index saying which tensor is in which."""

    files: tuple[Path, ...]
    weight_map: Mapping[str, str] | None = None

    def shard_of(self, name: str) -> str | None:
        return None if self.weight_map is None else self.weight_map.get(name)


def _find_weight_files(
    folder: Path, index_name: str, suffixes: tuple[str, ...], preferred: str
) -> _WeightFiles | None:
    index_path = folder / index_name
    if index_path.is_file():
        weight_map = _read_index(index_path)
        return _WeightFiles(tuple(folder / shard for shard in sorted(set(weight_map.values()))), weight_map)
    candidates = sorted(path for path in folder.iterdir() if path.is_file() and path.suffix in suffixes)
    if not candidates:
        return None
    if (folder / preferred).is_file():
        return _WeightFiles((folder / preferred,))
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates[:5])
        raise CheckpointError(
            f"model folder {folder} holds {len(candidates)} weight files ({names}) but no {index_name} "
            "saying which tensor is in which; copy the index file into the folder"
        )
    return _WeightFiles((candidates[0],))


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"index {index_path} is not valid JSON with a 'weight_map' ({error}); fetch or copy it again"
        ) from None
    if (
        not isinstance(weight_map, dict)
        or not weight_map
        or not all(isinstance(v, str) for v in weight_map.values())
    ):
        raise CheckpointError(
            f"index {index_path}: 'weight_map' must map tensor names to file names, and it is empty or holds "
            "something else; fetch or copy the index again"
        )
    outside = sorted({shard for shard in weight_map.values() if Path(shard).name != shard})
    if outside:
        raise CheckpointError(
            f"index {index_path} names files outside its folder ({', '.join(outside[:3])}); "
            "shards must be plain file names beside the index"
        )
    return weight_map


def _require_shards_present(folder: Path, weights: _WeightFiles) -> None:
    absent = [path.name for path in weights.files if not path.is_file()]
    if not absent:
        return
    shards = list((weights.weight_map or {}).values())
    listed = ", ".join(f"{name} ({shards.count(name)} tensors)" for name in absent)
    raise CheckpointError(
        f"model folder {folder}: the index names {len(absent)} shard file(s) that are not there: {listed}. "
        "The download is incomplete; fetch the missing files again"
    )


def _read_safetensors_folder(folder: Path, weights: _WeightFiles) -> dict[str, TensorInfo]:
    _require_shards_present(folder, weights)
    in_files = {path.name: read_safetensors_header(path) for path in weights.files}
    if weights.weight_map is None:
        return dict(next(iter(in_files.values())))
    _require_indexed_tensors(
        folder / SAFETENSORS_INDEX,
        [f"{name} (in {shard})" for name, shard in weights.weight_map.items() if name not in in_files[shard]],
    )
    return {
        name: info
        for shard in in_files.values()
        for name, info in shard.items()
        if weights.shard_of(name) == info.file.name
    }


# Small enough to stay in a core's cache between the read and the conversion.
_READ_BUFFER_BYTES = 2**20


class _SafetensorsReader:
    """One private, read-only-to-the-file mapping per file, shared by every tensor from it.

    ``read_into`` maps nothing: it reads through a buffer of the calling thread's own.
    """

    def __init__(self) -> None:
        self._storages: dict[Path, torch.UntypedStorage] = {}
        self._lock = threading.Lock()
        self._buffers = threading.local()

    def read_into(self, info: TensorInfo, flat: torch.Tensor, start_element: int) -> None:
        buffer = self._buffer()
        itemsize = info.dtype.itemsize
        per_read = len(buffer) // itemsize
        position = info.start_byte + start_element * itemsize
        descriptor = os.open(info.file, os.O_RDONLY)
        try:
            for done in range(0, flat.numel(), per_read):
                count = min(per_read, flat.numel() - done)
                _read_exactly(descriptor, buffer[: count * itemsize], position, info)
                flat[done : done + count].copy_(buffer[: count * itemsize].view(info.dtype))
                position += count * itemsize
        finally:
            os.close(descriptor)

    def _buffer(self) -> torch.Tensor:
        if not hasattr(self._buffers, "bytes"):
            self._buffers.bytes = torch.empty(_READ_BUFFER_BYTES, dtype=torch.uint8)
        return self._buffers.bytes

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        data = torch.empty(0, dtype=torch.uint8).set_(
            self._storage(info.file), info.start_byte, (info.size_bytes,)
        )
        # Viewing bytes as wider elements needs an aligned offset; a writer that did not
        # align its tensors costs one copy of this tensor.
        if info.start_byte % info.dtype.itemsize:
            data = data.clone()
        return data.view(info.dtype).reshape(info.shape)

    def _storage(self, path: Path) -> torch.UntypedStorage:
        with self._lock:
            if path not in self._storages:
                # shared=False maps the file copy-on-write: pages come from the page
                # cache, and nothing written to a tensor can reach the file.
                self._storages[path] = torch.UntypedStorage.from_file(
                    str(path), shared=False, nbytes=path.stat().st_size
                )
            return self._storages[path]


class _PickleReader:
    """Tensors of pickle checkpoints, loaded once with weights_only and mmap: file-backed too."""

    def __init__(self) -> None:
        self._tensors: dict[str, torch.Tensor] = {}

    def read_folder(self, folder: Path, weights: _WeightFiles) -> dict[str, TensorInfo]:
        _require_shards_present(folder, weights)
        tensors = {}
        for path in weights.files:
            for name, tensor in _load_pickle(path).items():
                if weights.weight_map is None or weights.shard_of(name) == path.name:
                    self._tensors[name] = tensor
                    tensors[name] = TensorInfo(name, path, tensor.dtype, tuple(tensor.shape))
        _require_indexed_tensors(folder / PICKLE_INDEX, sorted(set(weights.weight_map or {}) - set(tensors)))
        return tensors

    def tensor(self, info: TensorInfo) -> torch.Tensor:
        return self._tensors[info.name]

    def read_into(self, info: TensorInfo, flat: torch.Tensor, start_element: int) -> None:
        flat.copy_(self._tensors[info.name].reshape(-1)[start_element : start_element + flat.numel()])


def _read_exactly(descriptor: int, into: torch.Tensor, position: int, info: TensorInfo) -> None:
    """Read ``into.numel()`` bytes of open file ``descriptor`` at ``position``; a file ending first is truncated."""
    view = memoryview(into.numpy())
    done = 0
    while done < len(view):
        count = os.preadv(descriptor, [view[done:]], position + done)
        if count == 0:
            raise CheckpointError(
                f"{info.file} ends at byte {position + done}, inside tensor {info.name} (bytes "
                f"{info.start_byte}…{info.end_byte}); the file is truncated: fetch it again"
            )
        done += count


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"pickle checkpoint {path} holds more than tensors, which weights_only loading refuses "
            f"({_first_line(error)}); convert it to safetensors where it was made"
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise CheckpointError(
            f"pickle checkpoint {path} cannot be memory-mapped ({_first_line(error)}); it is truncated, "
            "corrupt or in torch's legacy format: fetch it again, re-save it with torch.save, or convert it "
            "to safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise CheckpointError(
            f"pickle checkpoint {path} is not a flat mapping of names to tensors (a state_dict); "
            "save model.state_dict() instead"
        )
    return state


def _require_indexed_tensors(index_path: Path, lacking: list[str]) -> None:
    if lacking:
        raise CheckpointError(
            f"index {index_path} names {len(lacking)} tensor(s) that their shard does not hold: "
            f"{first_of(lacking, 10)}. The index and the shards come from different saves; fetch them again together"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

