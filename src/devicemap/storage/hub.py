"""Models on the Hugging Face Hub by id: config.json, the safetensors headers, and the files a load needs.

Everything goes through huggingface_hub and its cache, so ``HF_HOME``, ``HF_HUB_CACHE``,
``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` mean what they mean there. A plan
reads config.json and each shard's header (range requests of about 100 kB), never the
weights: a 400B model plans in seconds. devicemap keeps no cache of its own here and writes
nothing into huggingface_hub's: a download that fails leaves only what huggingface_hub itself
keeps (``.incomplete`` blobs it resumes from next time).
"""

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, is_offline_mode, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    NotASafetensorsRepoError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)

from ..errors import CheckpointError, DeviceMapError
from .checkpoint import folder_tensors
from .safetensors_file import TensorInfo, torch_dtype_and_shape

# ORG/NAME as the Hub spells repository ids: letters, digits, '-', '_' and '.', no '--' or '..'.
_HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# What loading needs: weights as safetensors, and the config and tokenizer files beside them.
LOAD_PATTERNS = ("*.safetensors", "*.json", "*.model", "*.tiktoken", "merges.txt", "vocab.txt", "*.jinja")
# The modeling code a model ships (config.json's auto_map), fetched only to be run: trust_remote_code.
CODE_PATTERNS = ("*.py",)


def is_hub_id(reference: str) -> bool:
    """Whether ``reference`` reads as a Hub model id, ``ORG/NAME``.

    >>> is_hub_id("meta-llama/Llama-3.1-8B"), is_hub_id("./models/llama"), is_hub_id("llama")
    (True, False, False)
    """
    return _HUB_ID.fullmatch(reference) is not None


def hub_config(repo_id: str, revision: str | None = None) -> Path:
    """The path of the model's config.json in the Hugging Face cache, fetched when not there."""
    with _hub_errors(repo_id, revision):
        return Path(hf_hub_download(repo_id, "config.json", revision=revision))


def hub_tensors(repo_id: str, revision: str | None, snapshot: Path) -> Mapping[str, TensorInfo] | None:
    """Every safetensors tensor of the model, read from the shards' headers; ``None`` when it has none.

    Offline, the headers come from the shards in ``snapshot`` (the cache folder of its
    config.json) when the model was fetched for loading; a plan alone caches only the index.
    """
    if is_offline_mode():
        return folder_tensors(snapshot) if any(snapshot.glob("*.safetensors")) else None
    with _hub_errors(repo_id, revision):
        try:
            # A client of its own: the module-level one keeps the endpoint of when it was imported.
            metadata = HfApi().get_safetensors_metadata(repo_id, revision=revision)
        except NotASafetensorsRepoError:
            return None
        except SafetensorsParsingError as error:
            raise CheckpointError(f"model {repo_id} has a safetensors file whose header is corrupt: {error}") from None
    return {
        name: TensorInfo(name, Path(file), *_layout(repo_id, file, name, info.dtype, info.shape))
        for file, file_metadata in metadata.files_metadata.items()
        for name, info in file_metadata.tensors.items()
        if metadata.weight_map.get(name, file) == file
    }


def fetch_model(repo_id: str, revision: str | None = None, patterns: tuple[str, ...] = LOAD_PATTERNS) -> Path:
    """Download what loading the model needs into the Hugging Face cache and return its snapshot folder.

    Only the files ``patterns`` match are fetched (safetensors weights, config and tokenizer
    files: ``LOAD_PATTERNS``); files already in the cache are not fetched again.
    """
    with _hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns)))
    if not any(folder.glob("*.safetensors")):
        raise _without_weights(repo_id, revision, folder)
    return folder


def _layout(repo_id: str, file: str, name: str, dtype_name: str, shape: list[int]):
    try:
        return torch_dtype_and_shape(dtype_name, shape)
    except ValueError as error:
        raise CheckpointError(f"model {repo_id}: tensor {name!r} in {file} cannot be read: {error}") from None


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's errors as devicemap's: which of missing, gated or unreachable, and what to do."""
    at = f"the Hub at {constants.ENDPOINT}"
    try:
        yield
    except GatedRepoError:
        raise DeviceMapError(
            f"model {repo_id} on {at} is gated: accept its conditions on its page while logged in, then set "
            "HF_TOKEN to a token of that account (or run `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{at} has no model {repo_id}, or it is private and no token with access to it was given; check the "
            "id, or set HF_TOKEN to a token that can read it"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"model {repo_id} on {at} has no revision {revision!r}; pass a branch, tag or commit it has"
        ) from None
    except RemoteEntryNotFoundError:
        raise CheckpointError(
            f"model {repo_id} on {at} has no config.json at revision {revision or 'main'}; it is not a "
            "transformers model"
        ) from None
    except IncompleteSnapshotError as error:
        raise DeviceMapError(_partly_cached(repo_id, error.snapshot_path, at)) from None
    except (LocalEntryNotFoundError, httpx2.TransportError):
        raise DeviceMapError(_unreachable(repo_id, revision, at)) from None
    except HfHubHTTPError as error:
        raise DeviceMapError(
            f"{at} answered {error.response.status_code} for model {repo_id}; try again later"
        ) from None


def _unreachable(repo_id: str, revision: str | None, at: str) -> str:
    wanted = f"model {repo_id}" + (f" at revision {revision}" if revision else "")
    if is_offline_mode():
        return (
            f"{wanted} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE forbids "
            "fetching it; fetch it once online, or point HF_HOME at the cache that holds it"
        )
    return (
        f"cannot reach {at} for {wanted}, and it is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
        "check the network (and HF_ENDPOINT), or fetch the model where the Hub can be reached"
    )


def _partly_cached(repo_id: str, snapshot: str, at: str) -> str:
    blocked = "HF_HUB_OFFLINE forbids fetching the rest" if is_offline_mode() else f"{at} cannot be reached"
    return (
        f"model {repo_id} is only partly in the Hugging Face cache ({snapshot}), and {blocked}; fetch it again "
        "where the Hub can be reached"
    )


def _without_weights(repo_id: str, revision: str | None, snapshot: Path) -> DeviceMapError:
    """A snapshot with no safetensors: offline, one a plan cached (config.json only); online, a repo without them."""
    if is_offline_mode():
        return DeviceMapError(
            f"model {repo_id} is in the Hugging Face cache ({snapshot}) without its weights, as a plan leaves it, "
            "and HF_HUB_OFFLINE forbids fetching them; load it once with HF_HUB_OFFLINE unset"
        )
    return CheckpointError(
        f"model {repo_id} on the Hub at {constants.ENDPOINT} has no safetensors weights at revision "
        f"{revision or 'main'}; devicemap fetches only safetensors, as reading a pickle checkpoint can run code: "
        "pick a revision or repository with *.safetensors, or download it yourself and load the folder with "
        "allow_pickle=True"
    )
