"""The checkpoints the speed suite runs on, made once into a cache folder.

- the demo model (SmolLM2-135M-Instruct) at float32 and at bfloat16;
- a random-weight model shaped like TinyLlama-1.1B, bfloat16, in five shards.

Every folder is written beside its final place and renamed into it, so an
interrupted run never leaves a folder that looks complete.
"""

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CACHE_ENV = "DEVICEMAP_BENCH_CACHE"
INDEX = "model.safetensors.index.json"
_SHARD_NAME = "model-{index:05d}-of-{count:05d}.safetensors"
_READ_CHUNK_BYTES = 64 * 2**20
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
_FLOATING = {"F64", "F32", "F16", "BF16"}
# TinyLlama-1.1B's shape; random weights stand in for the real ones, which no hub serves here.
TINYLLAMA_SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class BenchModel:
    """A checkpoint folder the suite measures, with its short name and stored dtype."""

    name: str
    folder: Path
    dtype: str


def cache_folder() -> Path:
    """Where generated checkpoints live: ``$DEVICEMAP_BENCH_CACHE`` or ``~/.cache/devicemap/bench``.

    >>> cache_folder()  # doctest: +SKIP
    PosixPath('/home/me/.cache/devicemap/bench')
    """
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "devicemap" / "bench"


def demo_source(demo_model: str | None) -> Path:
    """The demo model's folder: the one given, else devicemap's own cached demo model.

    >>> demo_source("/models/SmolLM2-135M-Instruct")
    PosixPath('/models/SmolLM2-135M-Instruct')
    """
    if demo_model is not None:
        return Path(demo_model).expanduser().resolve()
    from devicemap.storage.demo import demo_model_path

    return Path(demo_model_path())


def demo_models(source: Path, cache: Path) -> tuple[BenchModel, BenchModel]:
    """The demo model at float32 and bfloat16: ``source`` itself where it already has that dtype,
    else a copy converted into ``cache`` once.

    >>> fp32, bf16 = demo_models(Path("SmolLM2-135M-Instruct"), cache_folder())  # doctest: +SKIP
    """
    # The source's path is part of the name, so another --demo-model never reuses these.
    tag = hashlib.sha1(str(source).encode()).hexdigest()[:8]
    stored = stored_dtypes(source)
    converted = []
    for dtype, stored_name in (("float32", "F32"), ("bfloat16", "BF16")):
        folder = source if stored == {stored_name} else cache / f"demo-{dtype}-{tag}"
        if not folder.is_dir():
            write_atomically(folder, lambda staging, dtype=dtype: convert_folder(source, staging, dtype))
        converted.append(BenchModel(f"demo-{short_dtype(dtype)}", folder, dtype))
    return converted[0], converted[1]


def stored_dtypes(folder: Path) -> set[str]:
    """The safetensors dtype names (``"F32"``, ``"BF16"``…) of the folder's floating tensors."""
    found = set()
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as stream:
            found |= {stream.get_slice(name).get_dtype() for name in stream.keys()}
    return found & _FLOATING


def tinyllama_model(cache: Path) -> BenchModel:
    """The random TinyLlama-1.1B-shaped bfloat16 checkpoint, generated into ``cache`` once.

    >>> tinyllama_model(cache_folder()).folder.name  # doctest: +SKIP
    'tinyllama-1.1b-random-bfloat16'
    """
    folder = cache / "tinyllama-1.1b-random-bfloat16"
    if not folder.is_dir():
        write_atomically(folder, lambda staging: write_random_llama(staging, TINYLLAMA_SHAPE, shard_count=5))
    return BenchModel("tinyllama-bf16", folder, "bfloat16")


def short_dtype(dtype: str) -> str:
    """``"bfloat16"`` -> ``"bf16"``, ``"float32"`` -> ``"fp32"``."""
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)


def write_atomically(folder: Path, write) -> None:
    """Call ``write(staging)`` on a fresh folder beside ``folder``, then rename it into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(staging)
        # mkdtemp makes the folder private; the cache is as readable as any other.
        staging.chmod(0o755)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def convert_folder(source: Path, target: Path, dtype: str) -> None:
    """Copy the model folder ``source`` into ``target`` with floating tensors cast to ``dtype``.

    Shard names and the index stay as they are; non-weight files (config, tokenizer)
    are copied, with the config's dtype updated.
    """
    torch_dtype = getattr(torch, dtype)
    total_bytes = 0
    for path in sorted(source.iterdir()):
        if path.suffix == ".safetensors":
            total_bytes += convert_file(path, target / path.name, torch_dtype)
        elif path.is_file() and path.name not in (INDEX, "config.json"):
            shutil.copy2(path, target / path.name)
    config = json.loads((source / "config.json").read_text())
    config.update(dtype=dtype, torch_dtype=dtype)
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (source / INDEX).is_file():
        index = json.loads((source / INDEX).read_text())
        index["metadata"] = {"total_size": total_bytes}
        (target / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def convert_file(source: Path, target: Path, dtype: torch.dtype) -> int:
    """Write ``source``'s tensors to ``target`` with floating ones cast to ``dtype``; their bytes."""
    with safe_open(source, framework="pt") as stream:
        tensors = {name: stream.get_tensor(name) for name in stream.keys()}
    tensors = {name: t.to(dtype) if t.is_floating_point() else t for name, t in tensors.items()}
    save_file(tensors, target, metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_random_llama(folder: Path, shape: dict, shard_count: int, seed: int = 0) -> None:
    """Write a Llama checkpoint of ``shape`` with random bfloat16 weights, in ``shard_count`` shards.

    Tensors are drawn and written one shard at a time, so memory stays near one shard.

    >>> write_random_llama(Path("tiny"), {"hidden_size": 64, "num_hidden_layers": 2}, shard_count=2)  # doctest: +SKIP
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shapes = {name: tuple(parameter.shape) for name, parameter in skeleton.named_parameters()}
    generator = torch.Generator().manual_seed(seed)
    groups = split_evenly(shapes, shard_count)
    weight_map = {}
    for number, names in enumerate(groups, start=1):
        file_name = _SHARD_NAME.format(index=number, count=len(groups))
        tensors = {name: random_weight(name, shapes[name], generator) for name in names}
        save_file(tensors, folder / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    total_bytes = sum(_elements(shape) * 2 for shape in shapes.values())
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(folder)


def random_weight(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A bfloat16 weight as initialised for training: norms at one, the rest N(0, 0.02)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def split_evenly(shapes: dict[str, tuple[int, ...]], count: int) -> list[list[str]]:
    """Cut the names, in order, into ``count`` consecutive groups of about equal elements.

    >>> split_evenly({"a": (2,), "b": (2,), "c": (4,)}, 2)
    [['a', 'b'], ['c']]
    """
    total = sum(_elements(shape) for shape in shapes.values())
    groups: list[list[str]] = [[] for _ in range(count)]
    done = 0
    for name, shape in shapes.items():
        # A tensor goes to the group its middle element falls in.
        middle = done + _elements(shape) / 2
        groups[min(count - 1, int(middle * count / total))].append(name)
        done += _elements(shape)
    return [group for group in groups if group]


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder, in name order."""
    return sorted(folder.glob("*.safetensors"))


def read_every_byte(folder: Path) -> int:
    """Read the folder's safetensors files once, into one reused buffer; the bytes read.

    Reading also leaves the files in the page cache, warm for the runs that follow.

    >>> read_every_byte(Path("SmolLM2-135M-Instruct"))  # doctest: +SKIP
    538090408
    """
    view = memoryview(bytearray(_READ_CHUNK_BYTES))
    total_bytes = 0
    for path in weight_files(folder):
        with path.open("rb", buffering=0) as stream:
            while count := stream.readinto(view):
                total_bytes += count
    return total_bytes


def _elements(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def layer_count(model: BenchModel) -> int:
    """The number of decoder layers, from the folder's config.json."""
    return json.loads((model.folder / "config.json").read_text())["num_hidden_layers"]


def layer_bytes(model: BenchModel, first_layer: int) -> int:
    """Bytes of the weights of decoder layers ``first_layer`` onwards, from the file headers.

    >>> layer_bytes(tinyllama_model(cache_folder()), 11)  # doctest: +SKIP
    484442112
    """
    total_bytes = 0
    for path in weight_files(model.folder):
        with safe_open(path, framework="pt") as stream:
            for name in stream.keys():
                if _layer_number(name) >= first_layer:
                    tensor = stream.get_slice(name)
                    total_bytes += _elements(tuple(tensor.get_shape())) * _DTYPE_BYTES[tensor.get_dtype()]
    return total_bytes


def converted_bytes(folder: Path, dtype: str) -> int:
    """Bytes of the folder's tensors once their floating ones are at ``dtype``, from the file headers.

    >>> converted_bytes(Path("SmolLM2-135M-Instruct"), "bfloat16")  # doctest: +SKIP
    269045184
    """
    floating_bytes = getattr(torch, dtype).itemsize
    total_bytes = 0
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as stream:
            for name in stream.keys():
                tensor = stream.get_slice(name)
                stored = tensor.get_dtype()
                size = floating_bytes if stored in _FLOATING else _DTYPE_BYTES[stored]
                total_bytes += _elements(tuple(tensor.get_shape())) * size
    return total_bytes


def _layer_number(name: str) -> int:
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else -1
