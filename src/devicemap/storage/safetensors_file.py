"""The safetensors file format: read a header with every check, write a file.

A file is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the tensors' bytes. Reading checks the header
against the file's size before any tensor is touched; writing streams one tensor, or
one piece of it, at a time, so it needs no second copy of them in memory. Checkpoint
shards and offload files are both written here.
"""

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError, DeviceMapError

# safetensors itself refuses headers above 100 MB; a larger length means a corrupt file.
_MAX_HEADER_BYTES = 100 * 2**20
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# MXFP4 scales, where this torch has their dtype.
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES["F8_E8M0"] = torch.float8_e8m0fnu
DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]
# A tensor, or consecutive flat pieces of it, each written before the next is asked for.
Produced = torch.Tensor | Iterable[torch.Tensor]
# 4-bit floats (MXFP4 and NVFP4 packs) count values in the header's shape, two to a byte;
# torch (where it has the dtype) holds them as pairs, so the last dimension halves.
_PACKED_PAIRS = {"F4": torch.float4_e2m1fn_x2} if hasattr(torch, "float4_e2m1fn_x2") else {}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of a checkpoint lives.

    ``start_byte`` and ``end_byte`` are absolute positions in ``file`` of the tensor's
    data (safetensors only; ``None`` for pickle checkpoints, whose layout torch owns).
    """

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start_byte: int | None = None
    end_byte: int | None = None

    @property
    def size_bytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Describe the tensors of one safetensors file, in data order, checking it is whole.

    The file's size is checked against every offset the header declares before any
    tensor is read, so a truncated download is an error here, not a crash later.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = Path(folder, "model.safetensors")
    ...     _ = write_safetensors(path, [("head.weight", torch.float32, (8, 4))], lambda name: torch.ones(8, 4))
    ...     read_safetensors_header(path)["head.weight"].shape
    (8, 4)
    """
    file_bytes = path.stat().st_size
    if file_bytes < 8:
        raise _corrupt(path, f"it has {file_bytes} bytes, fewer than the 8-byte header length")
    with path.open("rb") as stream:
        header_bytes = int.from_bytes(stream.read(8), "little")
        if header_bytes > min(file_bytes - 8, _MAX_HEADER_BYTES):
            raise _corrupt(
                path, f"its header claims {header_bytes} bytes but the file has {file_bytes} bytes in all"
            )
        raw_header = stream.read(header_bytes)
    try:
        header = json.loads(raw_header)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise _corrupt(path, f"its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    data_start = 8 + header_bytes
    tensors = [
        _parse_entry(path, name, entry, data_start)
        for name, entry in header.items()
        if name != "__metadata__"
    ]
    _require_data_within(path, tensors, file_bytes)
    return {info.name: info for info in sorted(tensors, key=lambda info: info.start_byte)}


def torch_dtype_and_shape(dtype_name: str, shape: list[int]) -> tuple[torch.dtype, tuple[int, ...]]:
    """The torch dtype and shape of a tensor a safetensors header lists as ``dtype_name`` and ``shape``.

    >>> torch_dtype_and_shape("F4", [4, 16])
    (torch.float4_e2m1fn_x2, (4, 8))
    """
    if dtype_name in _PACKED_PAIRS:
        if not shape or shape[-1] % 2:
            raise ValueError(f"{dtype_name} packs two values a byte, so the last of shape {shape} must be even")
        return _PACKED_PAIRS[dtype_name], (*shape[:-1], shape[-1] // 2)
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype {dtype_name!r} is none of {', '.join([*_DTYPES, *_PACKED_PAIRS])}")
    return _DTYPES[dtype_name], tuple(shape)


def _parse_entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    try:
        dtype_name, shape, (start, end) = entry["dtype"], list(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise _corrupt(path, f"tensor {name!r} has an invalid header entry {entry!r}") from None
    if not all(isinstance(size, int) and size >= 0 for size in (*shape, start, end)):
        raise _corrupt(path, f"tensor {name!r} has an invalid shape or offsets: {entry!r}")
    try:
        dtype, shape = torch_dtype_and_shape(dtype_name, shape)
    except (TypeError, ValueError) as error:
        raise _corrupt(path, f"tensor {name!r} has an invalid header entry {entry!r}: {error}") from None
    info = TensorInfo(name, path, dtype, shape, data_start + start, data_start + end)
    if end - start != info.size_bytes:
        raise _corrupt(
            path,
            f"tensor {name!r} spans {end - start} bytes but {dtype} {list(shape)} needs {info.size_bytes}",
        )
    return info


def _require_data_within(path: Path, tensors: list[TensorInfo], file_bytes: int) -> None:
    if not tensors:
        return
    last = max(tensors, key=lambda info: info.end_byte)
    if last.end_byte > file_bytes:
        raise _corrupt(
            path,
            f"its header says tensor {last.name!r} ends at byte {last.end_byte} but the file has only "
            f"{file_bytes} bytes ({last.end_byte - file_bytes} missing): it is truncated",
        )


def _corrupt(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(
        f"safetensors file {path} is corrupt or truncated: {reason}. Download or copy the file again"
    )


def write_safetensors(path: Path, specs: Sequence[TensorSpec], produce: Callable[[str], Produced]) -> int:
    """Write the safetensors file ``path`` of the tensors ``specs`` announces; return its size in bytes.

    ``produce(name)`` gives tensor ``name``, or consecutive flat pieces of it; each is
    written before the next is asked for, so a producer may reuse one buffer for them all
    and memory holds at most one tensor, however many the file has. Wider dtypes come
    first, so every tensor starts at a multiple of its element size and maps as it is.

    >>> import tempfile
    >>> tensors = {"weight": torch.ones(2, 2), "ids": torch.arange(3)}
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_safetensors(Path(folder, "block.safetensors"), specs_of(tensors), tensors.__getitem__)
    200
    """
    ordered = sorted(specs, key=lambda spec: -spec[1].itemsize)
    header, data_bytes = _encode_header(ordered)
    with path.open("wb") as stream:
        stream.write(header)
        for name, dtype, shape in ordered:
            pieces = produce(name)
            if isinstance(pieces, torch.Tensor):
                if tuple(pieces.shape) != tuple(shape):
                    raise _unannounced(path, name, f"{pieces.dtype} {list(pieces.shape)}", dtype, shape)
                pieces = (pieces,)
            elements = 0
            for piece in pieces:
                if piece.dtype != dtype:
                    raise _unannounced(path, name, f"{piece.dtype} pieces", dtype, shape)
                flat = piece.detach().to("cpu").contiguous().reshape(-1)
                stream.write(memoryview(flat.view(torch.uint8).numpy()))
                elements += piece.numel()
            if elements != math.prod(shape):
                raise _unannounced(path, name, f"{elements} elements", dtype, shape)
    return len(header) + data_bytes


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """What ``write_safetensors`` announces for ``tensors``: each one's name, dtype and shape.

    >>> specs_of({"weight": torch.ones(2, 3)})
    [('weight', torch.float32, (2, 3))]
    """
    return [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]


def file_bytes(specs: Sequence[TensorSpec]) -> int:
    """The size in bytes of the file ``write_safetensors`` writes for ``specs``.

    >>> file_bytes([("w", torch.float32, (2, 2))])
    112
    """
    header, data_bytes = _encode_header(specs)
    return len(header) + data_bytes

def _encode_header(specs: Sequence[TensorSpec]) -> tuple[bytes, int]:
    """The length-prefixed header for tensors stored in the order given, and their data's size in bytes.

    >>> _encode_header([("w", torch.float32, (2, 2))])[1]
    16
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset_bytes = 0
    for name, dtype, shape in specs:
        if dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {name!r} has dtype {dtype}, which safetensors cannot store")
        size_bytes = dtype.itemsize * math.prod(shape)
        header[name] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset_bytes, offset_bytes + size_bytes],
        }
        offset_bytes += size_bytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Padding the header to 8 bytes keeps the data 8-byte aligned in the file.
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, offset_bytes


def _unannounced(path: Path, name: str, came: str, dtype: torch.dtype, shape: Sequence[int]) -> DeviceMapError:
    return DeviceMapError(f"{path}: tensor {name!r} came as {came} where {dtype} {list(shape)} was announced")
