"""Loading a Hub id: fetched through huggingface_hub into its cache, then loaded like its folder.

Every test talks to the loopback Hub of ``hub_server`` (HF_ENDPOINT) with a cache of its
own (HF_HOME); the fixture fails a test that tries to connect anywhere else.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from hub_server import HubServer, hub, point_at_a_closed_port, set_offline  # noqa: F401  (hub is a fixture)
from models import save_random_model
from remote_models import write_gpt2_style
from safetensors.torch import load_file, save_file
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

import devicemap
from devicemap.cli import main
from devicemap.errors import CheckpointError, DeviceMapError

LAYERS_ON_DISK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
PROMPT = torch.tensor([[5, 17, 30, 42]])


def folder_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def tokens(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(PROMPT, max_new_tokens=6, do_sample=False)


def snapshot_files(home: Path) -> list[str]:
    """The names of every file in every snapshot of the Hugging Face cache under ``home``."""
    return sorted(path.name for path in home.glob("hub/models--*/snapshots/*/*"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    folder = save_random_model("llama", tmp_path_factory.mktemp("hub-load") / "llama", shards=2)
    (folder / "pytorch_model.bin").write_bytes(b"not to be fetched")
    (folder / "helper.py").write_text("raise SystemExit('not to be fetched')\n")
    return folder


def test_a_hub_id_loads_with_blocks_on_disk_and_generates_the_tokens_of_its_folder(hub, llama_folder, tmp_path):
    hub.add("org/llama", folder_files(llama_folder))
    options = dict(device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=tmp_path / "offload")
    model = devicemap.load("org/llama", **options)
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}
    assert torch.equal(tokens(model), tokens(devicemap.load(llama_folder, **options)))
    fetched = {path.rpartition("/")[2] for method, path in hub.requests if method == "GET"}
    assert "pytorch_model.bin" not in fetched and "helper.py" not in fetched
    expected = set(folder_files(llama_folder)) - {"pytorch_model.bin", "helper.py"}
    assert snapshot_files(tmp_path / "hf-home") == sorted(expected)


def test_a_revision_loads_that_revisions_weights(hub: HubServer, llama_folder, tmp_path):
    other = save_random_model("llama", tmp_path / "other", shards=1, seed=1)
    hub.add("org/versions", folder_files(llama_folder))
    hub.add("org/versions", folder_files(other), revision="v2")
    assert torch.equal(tokens(devicemap.load("org/versions", revision="v2", device_map="cpu")),
                       tokens(devicemap.load(other, device_map="cpu")))  # fmt: skip
    assert torch.equal(tokens(devicemap.load("org/versions", device_map="cpu")),
                       tokens(devicemap.load(llama_folder, device_map="cpu")))  # fmt: skip


def test_a_revision_for_a_local_folder_is_refused(llama_folder):
    with pytest.raises(DeviceMapError, match="revision 'v2' applies to Hub ids"):
        devicemap.load(llama_folder, revision="v2")


def test_offline_a_model_loaded_once_loads_from_the_cache_without_asking_the_hub(hub, llama_folder, monkeypatch):
    hub.add("org/llama", folder_files(llama_folder))
    online = tokens(devicemap.load("org/llama", device_map="cpu"))
    set_offline(monkeypatch, offline=True)
    asked = len(hub.requests)
    assert torch.equal(tokens(devicemap.load("org/llama", device_map="cpu")), online)
    assert len(hub.requests) == asked


def test_offline_a_model_only_planned_says_its_weights_are_not_in_the_cache(hub, llama_folder, monkeypatch):
    hub.add("org/planned", folder_files(llama_folder))
    devicemap.plan("org/planned", "cpu", max_memory={"cpu": "1GiB"})
    set_offline(monkeypatch, offline=True)
    with pytest.raises(DeviceMapError, match="org/planned is in the Hugging Face cache .* without its weights"):
        devicemap.load("org/planned", device_map="cpu")


def _missing(hub, monkeypatch) -> str:
    return "org/nothing"


def _gated(hub, monkeypatch) -> str:
    hub.add("org/gated", {"config.json": b"{}"}, token="hf_reader")
    return "org/gated"


def _unreachable(hub, monkeypatch) -> str:
    point_at_a_closed_port(monkeypatch)
    return "org/llama"


def _offline(hub, monkeypatch) -> str:
    set_offline(monkeypatch, offline=True)
    return "org/llama"


@pytest.mark.parametrize(
    ("served_as", "revision", "error", "message"),
    [
        (_missing, None, CheckpointError, "has no model org/nothing.*check the id"),
        (_gated, None, DeviceMapError, "org/gated .* is gated.*HF_TOKEN"),
        (_unreachable, None, DeviceMapError, "cannot reach the Hub at http://127.0.0.1.*check the network"),
        (_offline, None, DeviceMapError, "not in the Hugging Face cache.*HF_HUB_OFFLINE"),
        (lambda hub, monkeypatch: "org/llama", "v3", CheckpointError, "has no revision 'v3'"),
    ],
    ids=["missing", "gated", "unreachable", "offline", "no-such-revision"],
)
def test_a_hub_id_that_cannot_be_fetched_says_why_and_leaves_nothing_behind(
    hub, llama_folder, offload, tmp_path, monkeypatch, served_as, revision, error, message
):
    hub.add("org/llama", folder_files(llama_folder))
    with pytest.raises(error, match=message):
        devicemap.load(served_as(hub, monkeypatch), revision=revision, offload_folder=offload)
    assert sorted(path.name for path in offload.iterdir()) == ["theirs.txt"]
    assert snapshot_files(tmp_path / "hf-home") == []


def test_a_gated_model_loads_with_hf_token(hub: HubServer, llama_folder, monkeypatch):
    hub.add("org/gated", folder_files(llama_folder), token="hf_reader")
    monkeypatch.setenv("HF_TOKEN", "hf_reader")
    assert torch.equal(tokens(devicemap.load("org/gated", device_map="cpu")),
                       tokens(devicemap.load(llama_folder, device_map="cpu")))  # fmt: skip


def test_a_hub_id_without_safetensors_is_named(hub: HubServer, llama_folder):
    hub.add("org/pickled", {name: content for name, content in folder_files(llama_folder).items()
                            if not name.startswith("model")})  # fmt: skip
    with pytest.raises(CheckpointError, match="org/pickled .* has no safetensors weights at revision main"):
        devicemap.load("org/pickled")


def test_a_load_failing_after_the_fetch_leaves_the_offload_folder_as_it_was_and_the_cache_as_fetched(
    hub: HubServer, random_model_folder, offload, tmp_path
):
    folder = Path(shutil.copytree(random_model_folder("qwen3-moe", shards=1), tmp_path / "moe"))
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.3.mlp.experts.2.up_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    hub.add("org/moe", folder_files(folder))
    layers_on_disk = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                      "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
    with pytest.raises(CheckpointError, match="gate_up_proj is built from 8 checkpoint tensors"):
        devicemap.load("org/moe", device_map=layers_on_disk, dtype=torch.bfloat16, offload_folder=offload)
    assert sorted(path.name for path in offload.iterdir()) == ["theirs.txt"]
    assert snapshot_files(tmp_path / "hf-home") == sorted(folder_files(folder))
    assert not list((tmp_path / "hf-home").rglob("*.incomplete"))


def test_a_hub_id_shipping_its_own_code_is_fetched_with_it_only_when_trusted(hub: HubServer, tmp_path):
    folder = write_gpt2_style(tmp_path / "tinygpt")
    hub.add("org/tinygpt", folder_files(folder))
    with pytest.raises(CheckpointError, match="ships its own modeling code.*pass trust_remote_code=True"):
        devicemap.load("org/tinygpt")
    assert not [name for name in snapshot_files(tmp_path / "hf-home") if name.endswith(".py")]
    model = devicemap.load("org/tinygpt", trust_remote_code=True, device_map="cpu")
    plain = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert torch.equal(tokens(model), tokens(plain))


def test_offline_code_never_fetched_is_named_as_the_part_of_the_model_not_in_the_cache(hub, tmp_path, monkeypatch):
    hub.add("org/tinygpt", folder_files(write_gpt2_style(tmp_path / "tinygpt")))
    with pytest.raises(CheckpointError, match="ships its own modeling code"):
        devicemap.load("org/tinygpt")
    set_offline(monkeypatch, offline=True)
    with pytest.raises(DeviceMapError, match="org/tinygpt is only partly in the Hugging Face cache.*HF_HUB_OFFLINE"):
        devicemap.load("org/tinygpt", trust_remote_code=True)


@pytest.fixture(scope="module")
def tiny_chat_model(demo_model, tmp_path_factory) -> Path:
    """A two-layer random Llama with the demo model's tokenizer, small enough to serve."""
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hub-cli") / "tiny"
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model / name, folder / name)
    return folder


def test_generate_a_hub_id_at_a_revision_prints_what_its_folder_prints(hub: HubServer, tiny_chat_model, capsys):
    hub.add("org/tiny", folder_files(tiny_chat_model), revision="v1")
    options = ["--max-new-tokens", "5", "--json", "--max-memory", "cpu=1GiB"]
    assert main(["generate", "org/tiny", "Hello", "--revision", "v1", *options]) == 0
    from_hub = json.loads(capsys.readouterr().out)
    assert main(["generate", str(tiny_chat_model), "Hello", *options]) == 0
    local = json.loads(capsys.readouterr().out)
    assert [answer["text"] for answer in from_hub] == [answer["text"] for answer in local]
    assert from_hub[0]["new_tokens"] == 5


def test_generate_with_a_revision_and_no_hub_id_exits_2_saying_so(capsys):
    assert main(["generate", "Hello", "--revision", "v1"]) == 2
    assert "--revision v1 applies to a Hub id ORG/NAME" in capsys.readouterr().err
