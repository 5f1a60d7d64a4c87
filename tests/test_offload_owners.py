"""Offload folders left by killed processes are reclaimed; nothing of a live process, or of anyone else, is touched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import build_random_model

from devicemap.cli import main
from devicemap.runtime.load import load
from devicemap.storage.offload import remove_stale, stale_folders
from devicemap.storage.owner import RECORD_NAME, is_gone, read_owner, this_process, write_owner

LAYERS_ON_DISK = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip

# Loads a model whose disk blocks are converted, says where its offload folder is, then holds it.
HOLDER = """
import json, sys, time
from pathlib import Path
import torch
from devicemap.runtime.load import load
model = load(sys.argv[1], device_map=json.loads(sys.argv[3]), dtype=torch.bfloat16, offload_folder=sys.argv[2])
print(next(path for path in Path(sys.argv[2]).iterdir() if path.name.startswith("devicemap-")), flush=True)
time.sleep(600)
"""


def start_holder(checkpoint: Path, offload: Path) -> tuple[subprocess.Popen, Path]:
    """A process holding a model loaded with converted disk blocks, and its offload folder."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(checkpoint), str(offload), json.dumps(LAYERS_ON_DISK)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    folder = Path(holder.stdout.readline().strip())
    assert folder.name.startswith("devicemap-"), "the holder loaded its model"
    return holder, folder


def stop(holder: subprocess.Popen) -> None:
    """Kill ``holder`` as the OOM killer would: no handler, no exit hook runs."""
    holder.kill()
    holder.wait()
    holder.stdout.close()


def a_dead_pid() -> int:
    """The id of a process that has ended and been reaped."""
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(ended.stdout)


def owned_folder(path: Path, **changes) -> Path:
    """A folder holding this process's owner record, with ``changes`` made to its fields."""
    path.mkdir()
    (path / "block-00000.safetensors").write_bytes(b"\0" * 1000)
    write_owner(path)
    record = json.loads((path / RECORD_NAME).read_text())
    (path / RECORD_NAME).write_text(json.dumps({**record, **changes}))
    return path


def greedy(model) -> torch.Tensor:
    ids = torch.randint(3, 512, (1, 6), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)


def test_a_killed_processs_folder_is_reclaimed_by_the_next_load_which_generates_the_plain_tokens(
    random_model_folder, offload
):
    checkpoint = random_model_folder("llama")
    holder, left = start_holder(checkpoint, offload)
    stop(holder)
    assert left.is_dir() and read_owner(left).pid == holder.pid
    model = load(checkpoint, device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=offload)
    assert not left.exists()
    (ours,) = [path for path in offload.iterdir() if path.name.startswith("devicemap-")]
    assert read_owner(ours) == this_process()
    assert (offload / "theirs.txt").read_text() == "kept"
    assert torch.equal(greedy(model), greedy(build_random_model("llama", torch.bfloat16)))


def test_a_live_processs_folder_is_never_touched_by_another_load_or_by_clean(random_model_folder, offload, capsys):
    checkpoint = random_model_folder("llama")
    holder, held = start_holder(checkpoint, offload)
    try:
        files = sorted(path.name for path in held.iterdir())
        load(checkpoint, device_map=LAYERS_ON_DISK, dtype=torch.bfloat16, offload_folder=offload)
        assert main(["clean", str(offload), "--yes"]) == 0
        assert sorted(path.name for path in held.iterdir()) == files
        assert "removed 0 offload folder(s)" in capsys.readouterr().out
        assert stale_folders(offload) == []
    finally:
        stop(holder)
    assert [stale.path for stale in stale_folders(offload)] == [held]


@pytest.mark.parametrize(
    "changes, gone",
    [
        ({}, False),
        ({"started": "1"}, True),
        ({"boot": "a boot before the last restart"}, True),
        ({"host": "another-machine-sharing-this-folder"}, False),
        ({"pid_namespace": "pid:[1]"}, False),
    ],
    ids=["this-process", "pid-reused-by-a-later-process", "machine-restarted", "other-host", "other-pid-namespace"],
)
def test_a_folder_is_stale_only_when_its_owner_is_provably_gone(changes, gone, offload):
    folder = owned_folder(offload / "devicemap-abc123", **changes)
    assert is_gone(read_owner(folder)) is gone
    assert [stale.path for stale in remove_stale(offload)] == ([folder] if gone else [])
    assert folder.exists() is not gone


def test_a_record_naming_a_pid_that_now_belongs_to_another_process_counts_as_stale(offload):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        folder = owned_folder(offload / ".devicemap-abc123.partial", pid=sleeper.pid)
        assert [stale.path for stale in stale_folders(offload)] == [folder]
        assert [stale.path for stale in remove_stale(offload)] == [folder]
        assert not folder.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_record_naming_a_process_that_ended_counts_as_stale(offload):
    folder = owned_folder(offload / "devicemap-abc123", pid=a_dead_pid())
    (stale,) = stale_folders(offload)
    assert (stale.path, stale.size_bytes) == (folder, 1000 + (folder / RECORD_NAME).stat().st_size)
    remove_stale(offload)
    assert sorted(path.name for path in offload.iterdir()) == ["theirs.txt"]


def test_what_is_not_devicemaps_is_never_touched(offload):
    dead = a_dead_pid()
    untouched = [
        offload / "theirs.txt",
        owned_folder(offload / "devicemap-x", pid=dead, kind="someone else's folder"),
        owned_folder(offload / "mine-not-devicemap", pid=dead),
        owned_folder(offload / "devicemap-abc.partial", pid=dead),
        owned_folder(offload / "devicemap-UPPER", pid=dead),
    ]
    no_record = offload / "devicemap-y"
    no_record.mkdir()
    (no_record / "weights.bin").write_text("kept")
    unreadable = offload / ".devicemap-z.partial"
    unreadable.mkdir()
    (unreadable / RECORD_NAME).write_text("{not json")
    target = owned_folder(offload / "elsewhere", pid=dead)
    (offload / "devicemap-link").symlink_to(target)
    os.mkfifo(owned_folder(offload / "devicemap-fifo", pid=dead) / "pipe")
    (offload / "devicemap-fifo" / RECORD_NAME).unlink()
    os.mkfifo(offload / "devicemap-fifo" / RECORD_NAME)
    everything = sorted(offload.rglob("*"))
    assert stale_folders(offload) == []
    assert remove_stale(offload) == []
    assert main(["clean", str(offload), "--yes"]) == 0
    assert sorted(offload.rglob("*")) == everything
    assert all(path.exists() for path in untouched)


def test_clean_lists_with_sizes_and_removes_only_with_yes(offload, capsys):
    folder = owned_folder(offload / "devicemap-abc123", pid=a_dead_pid())
    (folder / "block-00001.safetensors").write_bytes(b"\0" * 3 * 2**20)
    assert main(["clean", str(offload)]) == 0
    listed = capsys.readouterr().out
    assert f"3.0 MiB  {folder}  (process " in listed
    assert "1 offload folder(s), 3.0 MiB, left by processes that are gone; pass --yes to remove them" in listed
    assert folder.exists()
    assert main(["clean", str(offload), "--yes"]) == 0
    assert "removed 1 offload folder(s), 3.0 MiB" in capsys.readouterr().out
    assert sorted(path.name for path in offload.iterdir()) == ["theirs.txt"]


def test_clean_with_nothing_stale_says_so(offload, capsys):
    assert main(["clean", str(offload)]) == 0
    assert f"no offload folders left by processes that are gone in {offload}" in capsys.readouterr().out


def test_clean_of_a_folder_that_does_not_exist_exits_2_naming_it(tmp_path, capsys):
    assert main(["clean", str(tmp_path / "nowhere")]) == 2
    assert f"offload folder {tmp_path / 'nowhere'} does not exist" in " ".join(capsys.readouterr().err.split())
