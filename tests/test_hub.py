"""Hub ids: a plan reads config.json and the safetensors headers through huggingface_hub, nothing else.

Every test talks to the loopback Hub of ``hub_server`` (HF_ENDPOINT), with a cache of its
own (HF_HOME); the fixture fails a test that tries to connect anywhere else.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from header_checkpoints import awq_tensors, dense_tensors, header_file, index_file, shard
from hub_server import (  # noqa: F401  (hub is a fixture)
    HubFile, HubServer, hub, hub_environment, point_at_a_closed_port, set_offline,
)  # fmt: skip
from models import save_random_model
from transformers import LlamaConfig

import devicemap
from benchmarks.published_configs import PUBLISHED
from devicemap.cli import main
from devicemap.errors import CheckpointError, DeviceMapError
from devicemap.storage.checkpoint import open_checkpoint
from devicemap.storage.reference import model_folder

CPU = {"cpu": "8GiB"}
HEADER_RANGE_BYTES = 100_001
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def header_repo(config: LlamaConfig, tensors: dict, shards: int) -> dict[str, bytes | HubFile]:
    """A repo of sparse shards (real headers, zeros after), an index and config.json."""
    files = shard(tensors, shards)
    served = {name: HubFile(*header_file(held)) for name, held in files.items()}
    return {**served, "model.safetensors.index.json": index_file(files), "config.json": config.to_json_string().encode()}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = save_random_model("llama", tmp_path_factory.mktemp("hub") / "llama", shards=2)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not to be fetched")
    return folder


def test_a_hub_id_is_planned_exactly_as_its_folder_from_config_and_headers_only(hub: HubServer, llama_folder):
    hub.add("org/llama", folder_files(llama_folder))
    from_hub = devicemap.plan("org/llama", "cpu", max_memory=CPU)
    local = devicemap.plan(llama_folder, "cpu", max_memory=CPU)
    assert from_hub.profile.blocks == local.profile.blocks
    assert from_hub.profile.name == "org/llama"
    fetched = {path.rpartition("/")[2] for method, path in hub.requests if method == "GET"}
    assert "pytorch_model.bin" not in fetched and "tokenizer.json" not in fetched
    weights = sum(path.stat().st_size for path in llama_folder.glob("*.safetensors"))
    assert hub.served_bytes < weights / 2


@pytest.mark.parametrize("quantized", [False, True], ids=["bfloat16", "awq-4bit"])
def test_a_405b_model_plans_from_headers_without_downloading_weights(hub: HubServer, quantized):
    config = PUBLISHED["llama-3.1-405b"]()
    if quantized:
        config.quantization_config = AWQ
    hub.add("meta/llama-405b", header_repo(config, awq_tensors(config) if quantized else dense_tensors(config), 191))
    plan = devicemap.plan("meta/llama-405b", max_memory={**{gpu: "80GiB" for gpu in range(8)}, "cpu": "1TiB"})
    weight_bytes = sum(block.weight_bytes for block in plan.profile.blocks)
    assert weight_bytes == pytest.approx(405e9 * (0.5 if quantized else 2), rel=0.1)
    # huggingface_hub reads the first 100 kB of each shard, where the header is: 19 MB of 800 GB.
    assert hub.served_bytes < 191 * HEADER_RANGE_BYTES + 2**20


def test_a_gated_model_needs_hf_token_and_plans_with_it(hub: HubServer, llama_folder, monkeypatch):
    hub.add("org/gated", folder_files(llama_folder), token="hf_reader")
    with pytest.raises(DeviceMapError, match=r"org/gated .* is gated.*HF_TOKEN"):
        devicemap.plan("org/gated", "cpu", max_memory=CPU)
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    assert devicemap.plan("org/gated", "cpu", max_memory=CPU).profile.name == "org/gated"


def test_a_missing_model_is_named_and_leaves_nothing_in_the_cache(hub: HubServer, tmp_path):
    with pytest.raises(CheckpointError, match="has no model org/nothing"):
        devicemap.plan("org/nothing", "cpu", max_memory=CPU)
    assert not list((tmp_path / "hf-home").rglob("config.json"))


def test_a_hub_that_cannot_be_reached_says_so(hub: HubServer, monkeypatch):
    point_at_a_closed_port(monkeypatch)
    with pytest.raises(DeviceMapError, match="cannot reach the Hub at http://127.0.0.1"):
        devicemap.plan("org/llama", "cpu", max_memory=CPU)


def test_a_revision_plans_that_revision_and_a_missing_one_is_named(hub: HubServer, capsys):
    for revision, layers in (("main", 2), ("v2", 3)):
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128)  # fmt: skip
        hub.add("org/versions", header_repo(config, dense_tensors(config), 1), revision=revision)
    layers = [block.name for block in devicemap.plan("org/versions", "cpu", revision="v2").profile.blocks]
    assert "model.layers.2" in layers
    assert main(["plan", "org/versions", "--revision", "v2", "--max-memory", "cpu=1GiB", "--json"]) == 0
    assert "model.layers.2" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="has no revision 'v3'"):
        devicemap.plan("org/versions", "cpu", revision="v3")


def test_offline_a_cached_model_plans_from_the_cache_and_an_uncached_one_is_named(hub, llama_folder, monkeypatch):
    hub.add("org/llama", folder_files(llama_folder))
    online = devicemap.plan("org/llama", "cpu", max_memory=CPU)
    set_offline(monkeypatch, offline=True)
    asked = len(hub.requests)
    assert devicemap.plan("org/llama", "cpu", max_memory=CPU).profile.blocks == online.profile.blocks
    with pytest.raises(DeviceMapError, match="not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        devicemap.plan("org/elsewhere", "cpu", max_memory=CPU)
    assert len(hub.requests) == asked


def test_a_hub_id_resolves_for_loading_to_safetensors_config_and_tokenizer_in_the_cache(hub, llama_folder, monkeypatch):
    hub.add("org/llama", folder_files(llama_folder))
    folder = model_folder("org/llama")
    assert folder.parent.name == "snapshots"
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        name for name in folder_files(llama_folder) if name != "pytorch_model.bin"
    )
    assert open_checkpoint(folder).shapes == open_checkpoint(llama_folder).shapes
    set_offline(monkeypatch, offline=True)
    assert model_folder("org/llama") == folder
    assert model_folder(llama_folder) == llama_folder


def test_the_command_line_plans_a_hub_id_in_a_fresh_process_reading_the_environment(hub: HubServer, tmp_path):
    config = PUBLISHED["llama-3-70b"]()
    config.quantization_config = AWQ
    hub.add("org/llama-70b-awq", header_repo(config, awq_tensors(config), 9), revision="v1")
    environment = {**os.environ, **hub_environment(hub.url, tmp_path / "fresh-home")}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(devicemap.__file__).parents[1]),
                                                              environment.get("PYTHONPATH")]))  # fmt: skip
    finished = subprocess.run(
        [sys.executable, "-m", "devicemap", "plan", "org/llama-70b-awq", "--revision", "v1",
         "--max-memory", "0=24GiB,1=24GiB,cpu=64GiB"],
        capture_output=True, text=True, env=environment, timeout=300,
    )  # fmt: skip
    assert finished.returncode == 0, finished.stderr
    assert "org/llama-70b-awq" in finished.stdout and "cuda:1" in finished.stdout
    assert list((tmp_path / "fresh-home" / "hub").glob("models--org--llama-70b-awq/snapshots/*/config.json"))
    assert hub.served_bytes < 2**20


def test_a_revision_for_a_local_folder_is_refused(llama_folder):
    with pytest.raises(DeviceMapError, match="revision 'v2' applies to Hub ids"):
        devicemap.plan(llama_folder, "cpu", revision="v2")


def test_a_config_json_served_is_what_the_plan_reads(hub: HubServer, llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    hub.add("org/config-only", {"config.json": json.dumps({**config, "num_hidden_layers": 1}).encode()})
    blocks = [block.name for block in devicemap.plan("org/config-only", "cpu", max_memory=CPU).profile.blocks]
    assert "model.layers.0" in blocks and "model.layers.1" not in blocks
