"""Dispatch: hooks at block boundaries only, inputs moved, offloaded weights fetched ahead and let go."""

import gc
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from models import build_random_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import devicemap
from benchmarks.speed_pages import drop_pages, read_bytes, whole_files
from devicemap.planning.plan import Placement
from devicemap.runtime.dispatch import _Prefetcher, dispatch, is_dispatched, remove_dispatch
from devicemap.runtime.load import load
from devicemap.runtime.moving import moved
from devicemap.runtime.paging import HostPager, PageRange, page_ranges
from devicemap.runtime.streaming import aligned_offsets

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def llama_map(layer_device: str, layers=range(6)) -> dict[str, str]:
    others = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    return {**others, **{f"model.layers.{i}": layer_device if i in layers else "cpu" for i in range(6)}}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def hooked(model) -> tuple[dict[str, int], dict[str, int]]:
    """Module name → number of forward pre-hooks, and of forward hooks, for every hooked module."""
    modules = dict(model.named_modules())
    pre = {name: len(module._forward_pre_hooks) for name, module in modules.items() if module._forward_pre_hooks}
    post = {name: len(module._forward_hooks) for name, module in modules.items() if module._forward_hooks}
    return pre, post


IDS = torch.tensor([[5, 17, 42, 99, 3]])


class Recorder:
    """A fetcher that records what the prefetcher asks of it."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, action):
        return lambda name: self.calls.append((action, name))


def test_every_block_gets_one_pre_hook_and_no_module_below_a_block_gets_any(random_model_folder):
    model = load(random_model_folder("llama"), device_map="cpu")
    pre, post = hooked(model)
    blocks = [placement.block for placement in model.devicemap_plan.placements]
    assert sorted(pre) == sorted(blocks)
    assert set(pre.values()) == {1}
    assert post == {"": 1}, "only the model's output goes back to its inputs' device"


def test_offloaded_blocks_also_get_a_hook_that_lets_their_weights_go(random_model_folder, tmp_path):
    model = load(random_model_folder("llama"), device_map=llama_map("disk", [2, 3]), offload_folder=tmp_path)
    _, post = hooked(model)
    assert post == {"": 1, "model.layers.2": 1, "model.layers.3": 1}


def test_remove_dispatch_takes_every_hook_and_thread_away(random_model_folder, tmp_path):
    model = load(random_model_folder("llama"), device_map=llama_map("disk"), offload_folder=tmp_path)
    executor = model.__dict__["_devicemap_dispatch"].executor
    remove_dispatch(model)
    assert hooked(model) == ({}, {})
    assert not is_dispatched(model)
    assert executor._shutdown


def test_dispatching_a_module_in_memory_onto_disk_writes_safetensors_and_keeps_its_outputs(tmp_path):
    model = build_random_model("llama")
    expected = logits(model, IDS)
    dispatch(model, llama_map("disk", [0, 5]), offload_folder=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith("devicemap-")
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 2
    with safe_open(str(files[0]), framework="pt") as written:
        first = written.get_tensor("model.layers.0.mlp.up_proj.weight")
    assert torch.equal(first, model.model.layers[0].mlp.up_proj.weight)
    weight = model.model.layers[5].self_attn.q_proj.weight
    assert weight.untyped_storage().nbytes() <= files[1].stat().st_size, "a view of the file, not a copy"
    assert torch.equal(logits(model, IDS), expected)


def test_dispatch_never_touches_files_it_did_not_create_and_removes_its_own_with_the_model(tmp_path):
    theirs = tmp_path / "devicemap-notes.txt"
    theirs.write_text("kept")
    (tmp_path / "block-00000.safetensors").write_bytes(b"not ours")
    model = dispatch(build_random_model("llama"), llama_map("disk"), offload_folder=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3
    del model
    gc.collect()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["block-00000.safetensors", "devicemap-notes.txt"]
    assert theirs.read_text() == "kept"


def test_dispatch_on_a_map_of_one_device_keeps_outputs():
    model = build_random_model("gpt2")
    expected = logits(model, IDS)
    dispatch(model, "cpu")
    assert torch.equal(logits(model, IDS), expected)


def test_tied_weights_written_to_disk_stay_one_tensor(tmp_path):
    model = build_random_model("llama-tied")
    head = {"model.embed_tokens": "disk", "lm_head": "disk", "model": "cpu"}
    dispatch(model, head, offload_folder=tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_inputs_are_moved_through_tuples_and_dicts_and_caches_are_left_alone():
    class Cache:
        pass

    cache = Cache()
    inputs = ((torch.ones(2), [torch.zeros(1)]), {"mask": torch.ones(3), "cache": cache, "n": 3})
    result = moved(inputs, torch.device("meta"), non_blocking=False)
    assert result[0][0].device.type == "meta" and result[0][1][0].device.type == "meta"
    assert result[1]["mask"].is_meta and result[1]["cache"] is cache and result[1]["n"] == 3
    assert inputs[1]["mask"].device.type == "cpu", "the caller's dict is not changed"
    assert moved(inputs, torch.device("cpu"), non_blocking=False) is inputs, "nothing to move: no copy"


def test_the_prefetcher_fetches_the_next_blocks_in_plan_order_cyclically():
    recorder = Recorder()
    prefetcher = _Prefetcher(["a", "b", "c"], dict.fromkeys("abc", recorder), depth=2)
    prefetcher.before("c")
    prefetcher.after("c")
    expected = [("prepare", "c"), ("fetch_ahead", "a"), ("fetch_ahead", "b"), ("bind", "c"), ("unbind", "c")]
    assert recorder.calls == expected


def test_the_prefetcher_learns_the_order_blocks_really_run_in():
    recorder = Recorder()
    prefetcher = _Prefetcher(["enc", "dec.0", "dec.1"], dict.fromkeys(["enc", "dec.0", "dec.1"], recorder), depth=1)
    for name in ["enc", "dec.0", "dec.1", "dec.0", "dec.1", "dec.0"]:
        prefetcher.before(name)
        prefetcher.after(name)
    ahead = [name for action, name in recorder.calls if action == "fetch_ahead"]
    assert ahead == ["dec.0", "dec.1", "enc", "dec.1", "dec.0", "dec.1"]


def test_page_ranges_cover_whole_pages_and_merge_neighbours():
    buffer = torch.empty(3 * 4096, dtype=torch.uint8)
    first, second = buffer[10:100], buffer[100:5000]
    (merged,) = page_ranges([second, first])
    assert merged.start % 4096 == 0 and merged.length_bytes % 4096 == 0
    assert merged.start <= first.data_ptr() and second.data_ptr() + second.nbytes <= merged.start + merged.length_bytes
    assert page_ranges([torch.empty(0)]) == ()
    assert isinstance(merged, PageRange)


@linux
def test_the_pager_reads_ahead_the_pages_of_a_block_that_are_not_in_memory(tmp_path):
    path = tmp_path / "block.bin"
    path.write_bytes(bytes(8 * 2**20))
    weights = torch.from_file(str(path), shared=False, size=8 * 2**20, dtype=torch.uint8)
    with path.open("rb+") as file:
        os.fsync(file.fileno())  # only clean pages leave the page cache
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with ThreadPoolExecutor(1) as executor:
        pager = HostPager({"block": page_ranges([weights])}, executor)
        assert pager._short("block"), "evicted pages are not in memory"
        pager.fetch_ahead("block")
    for _ in range(200):
        if not pager._short("block"):
            break
        time.sleep(0.01)
    assert not pager._short("block")


def test_tensors_in_a_slot_start_on_aligned_boundaries_one_after_another():
    offsets, total = aligned_offsets([torch.empty(3, dtype=torch.bfloat16), torch.empty(10), torch.empty(0)])
    assert offsets == [0, 256, 512] and total == 512


def _mapped_bytes(folder: Path) -> int:
    """Bytes of files under ``folder`` that this process has mapped in memory now (smaps Rss)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields[0]) > 8 and ":" not in fields[0]:
                inside = len(fields) >= 6 and fields[5].startswith(str(folder))
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@linux
def test_a_resident_limit_keeps_disk_blocks_mapped_bytes_under_it(random_model_folder, tmp_path):
    folder = random_model_folder("llama")
    unlimited = load(folder, device_map=llama_map("disk"), dtype=torch.bfloat16, offload_folder=tmp_path / "a")
    logits(unlimited, IDS)
    everything = _mapped_bytes(tmp_path / "a")
    limit = everything // 3
    limited = load(
        folder, device_map=llama_map("disk"), dtype=torch.bfloat16, offload_folder=tmp_path / "b",
        disk_resident_bytes=limit,
    )  # fmt: skip
    logits(limited, IDS)
    assert everything > 0
    assert _mapped_bytes(tmp_path / "b") <= limit + 2 * 4096 * 6


def assert_generates_like_the_plain_model_on_gpu(model, folder):
    reference = AutoModelForCausalLM.from_pretrained(folder).to("cuda:0")
    ids = IDS.to("cuda:0")
    expected = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("stored", ["cpu", "disk"])
def test_blocks_streamed_to_the_gpu_generate_the_plain_models_tokens(stored, random_model_folder, tmp_path):
    folder = random_model_folder("llama")
    placed = {**{key: 0 for key in llama_map("cpu")}, **{f"model.layers.{i}": stored for i in range(1, 6)}}
    model = load(folder, device_map=placed, offload_folder=tmp_path)
    assert {p.execution_device for p in model.devicemap_plan.offloaded()} == {"cuda:0"}
    assert_generates_like_the_plain_model_on_gpu(model, folder)


@gpu
@needs_two_gpus
@pytest.mark.parametrize("stored", ["cpu", "disk"])
def test_offloaded_blocks_spread_over_two_gpus_each_stream_their_own(stored, random_model_folder, tmp_path):
    folder = random_model_folder("llama")
    on_cpu = devicemap.plan(folder, "cpu")
    # As the planner spreads them: layers 1-2 computed on cuda:0, layers 3-5 on cuda:1.
    executing = {f"model.layers.{i}": "cuda:0" if i < 3 else "cuda:1" for i in range(1, 6)}
    on_first = {"model.embed_tokens", "model.rotary_emb", "model.layers.0"}

    def placed(block: str) -> Placement:
        if block in executing:
            return Placement(block, stored, executing[block])
        device = "cuda:0" if block in on_first else "cuda:1"
        return Placement(block, device, device)

    placements = tuple(placed(p.block) for p in on_cpu.placements)
    model = load(folder, device_map=replace(on_cpu, placements=placements), offload_folder=tmp_path)
    assert {p.execution_device for p in model.devicemap_plan.offloaded()} == {"cuda:0", "cuda:1"}
    assert_generates_like_the_plain_model_on_gpu(model, folder)


@gpu
@needs_cuda
def test_tied_weights_of_blocks_streamed_to_the_gpu_stay_one_tensor_there(random_model_folder):
    folder = random_model_folder("llama-tied")
    model = load(folder, device_map={**llama_map("cpu"), "model.norm": 0})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.device.type == "cuda", "shared by two blocks: kept where they compute"
    assert_generates_like_the_plain_model_on_gpu(model, folder)


@gpu
@needs_cuda
def test_outputs_return_to_the_inputs_device_and_the_cache_stays_with_its_layers(random_model_folder):
    folder = random_model_folder("llama")
    on_cpu = devicemap.plan(folder, "cpu")
    gpu_layer = Placement("model.layers.3", "cuda:0", "cuda:0")
    placements = tuple(gpu_layer if p.block == gpu_layer.block else p for p in on_cpu.placements)
    model = load(folder, device_map=replace(on_cpu, placements=placements))
    output = model(input_ids=IDS, use_cache=True)
    assert output.logits.device.type == "cpu"
    layer_devices = [layer.keys.device.type for layer in output.past_key_values.layers]
    assert layer_devices == ["cpu", "cpu", "cpu", "cuda", "cpu", "cpu"]


@linux
def test_a_module_dispatched_onto_disk_computes_the_same_from_its_written_blocks_when_they_are_cold(tmp_path):
    model = build_random_model("llama")
    expected = logits(model, IDS)
    dispatch(model, llama_map("disk"), offload_folder=tmp_path)
    (folder,) = tmp_path.iterdir()
    written = sorted(folder.iterdir())
    settle(written)
    drop_pages(whole_files(written))
    before = read_bytes()
    assert torch.equal(logits(model, IDS), expected)
    assert read_bytes() > before, "the blocks were read from disk again"


def settle(paths) -> None:
    """Write the files' pages back: only clean pages leave the page cache."""
    for path in paths:
        with open(path, "rb+") as file:
            os.fsync(file.fileno())


def cold_block(path: Path, size_bytes: int) -> tuple[torch.Tensor, dict]:
    """A file of ``size_bytes`` mapped as one tensor with none of its pages in memory, and its page ranges."""
    path.write_bytes(bytes(size_bytes))
    weights = torch.from_file(str(path), shared=False, size=size_bytes, dtype=torch.uint8)
    settle([path])
    drop_pages(whole_files([path]))
    return weights, {"block": page_ranges([weights])}


def wait_until_in_memory(pager: HostPager) -> bool:
    for _ in range(300):
        if not pager._short("block"):
            return True
        time.sleep(0.01)
    return False


@linux
def test_the_pager_reads_ahead_the_whole_of_a_block_larger_than_the_kernel_reads_for_one_advice(tmp_path):
    # One MADV_WILLNEED call reads at most the device's read-ahead size (128 KiB to 8 MiB commonly).
    weights, ranges = cold_block(tmp_path / "block.bin", 32 * 2**20)
    with ThreadPoolExecutor(1) as executor:
        pager = HostPager(ranges, executor)
        pager.fetch_ahead("block")
    assert wait_until_in_memory(pager)


@linux
def test_a_block_in_memory_when_fetched_ahead_but_gone_when_it_runs_is_read_again_before_it_runs(tmp_path):
    weights, ranges = cold_block(tmp_path / "block.bin", 16 * 2**20)
    with ThreadPoolExecutor(1) as executor:
        pager = HostPager(ranges, executor)
        weights.sum()  # in memory, and mapped
        pager.fetch_ahead("block")
        drop_pages(whole_files([tmp_path / "block.bin"]))  # memory ran short meanwhile
        assert pager._short("block")
        pager.prepare("block")
    assert wait_until_in_memory(pager)
