"""The CUDA paths: NCCL links that open without crossing, lost peers named, streamed blocks safe.

What decides whether these paths work is mostly ordering: which handshake each rank
joins first, which stream waits for which, which thread may write which buffer. That
logic runs here on the CPU (gloo ranks, plain threads, real models); the tests marked
``gpu`` run the same paths on a CUDA device (``python -m benchmarks gpu`` runs them all).
"""

import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from graphlib import TopologicalSorter

import pytest
import torch
from models import build_random_model
from torch import nn
from transformers import AutoModelForCausalLM

from devicemap.model.profile import profile_module
from devicemap.pipeline.wire import _NCCL_ERROR_HANDLING, PeerLostError, _errors_raised_by_waits, peer_lost
from devicemap.planning.ledger import STREAM_COPIES
from devicemap.runtime.dispatch import dispatch, remove_dispatch
from devicemap.runtime.load import load
from devicemap.runtime.streaming import (
    AcceleratorStreamer,
    StreamedBlock,
    _host_bytes,
    _pack_into,
    _wait_for,
    aligned_offsets,
    slot_layout,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

IDS = torch.tensor([[5, 17, 42, 99, 3]])
# About 30 ms of GPU time at 1.5 GHz: longer than any copy or layer of the small test models.
LAG_CYCLES = 50_000_000


# NCCL links: the first handshake of every pair, in an order no two ranks can cross.

_RECORDING_RANK = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from devicemap.pipeline.schedule import Request, run_request
from devicemap.pipeline.stage_model import build_stage
from devicemap.pipeline.wire import StageLinks
from devicemap.runtime.api import profile_of
from devicemap.planning.stages import split_stages


class RecordingLinks(StageLinks):
    '''Links that note (group, peer, operation) of every message they start.'''

    def __init__(self, *args):
        self.operations = []
        super().__init__(*args)
        self.opened = len(self.operations)

    def _start(self, operation, tensor, peer, group, doing):
        self.operations.append(("tokens" if group is self._token_group else "hidden", peer, operation.__name__))
        return super()._start(operation, tensor, peer, group, doing)


folder, rank, world_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
stages = split_stages(profile_of(folder), [2**30] * world_size)
stage = build_stage(folder, stages.blocks_of(rank), torch.device("cpu"))
links = RecordingLinks(rank, world_size, torch.device("cpu"), 60)
ids = torch.tensor([[5, 17, 42, 99], [0, 0, 7, 9], [3, 4, 5, 6]])
request = Request(ids, (ids != 0).long(), max_new_tokens=3, eos_token_ids=(), pad_token_id=0, micro_batches=3)
run_request(stage, links, request)
print(json.dumps({"opened": links.opened, "operations": links.operations}))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start_ranks(script: str, world_size: int, *arguments: str) -> list[subprocess.Popen]:
    """``world_size`` processes running ``script`` as the ranks of one gloo job on this machine."""
    port = str(_free_port())
    ranks = []
    for rank in range(world_size):
        environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "OMP_NUM_THREADS": "1"}  # fmt: skip
        command = [sys.executable, "-c", script, *arguments, str(rank), str(world_size)]
        ranks.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=environment))  # fmt: skip
    return ranks


def _last_lines(ranks: list[subprocess.Popen], limit_s: float = 120) -> list[str]:
    """Each rank's last line of output, once every rank has exited successfully."""
    lines = []
    for rank in ranks:
        out, err = rank.communicate(timeout=limit_s)
        assert rank.returncode == 0, err[-3000:]
        lines.append(out.strip().splitlines()[-1])
    return lines


def _first_uses(operations: list[list]) -> list[tuple[str, tuple[int, int]]]:
    """The (group, pair of ranks) links in the order this rank first used them."""
    firsts = {}
    for group, peer, _ in operations:
        firsts.setdefault((group, peer), None)
    return list(firsts)


def test_every_link_opens_with_one_message_in_rank_order_so_no_two_first_handshakes_cross(random_model_folder):
    world_size = 3
    ranks = _start_ranks(_RECORDING_RANK, world_size, str(random_model_folder("llama")))
    records = [json.loads(line) for line in _last_lines(ranks)]
    first_links = [_first_uses(record["operations"]) for record in records]
    assert first_links == [
        [("hidden", 1), ("tokens", 2)],
        [("hidden", 0), ("hidden", 2)],
        [("hidden", 1), ("tokens", 0)],
    ]
    for rank, record in enumerate(records):
        opening = record["operations"][: record["opened"]]
        assert [(group, peer) for group, peer, _ in opening] == first_links[rank], "each link's first message opens it"
        for group, peer, operation in opening:
            assert operation == ("isend" if rank < peer else "irecv"), "the lower rank sends, the higher receives"
    # A rank blocks in each first handshake until its peer joins: the order in which the
    # ranks meet their links must be one order all of them follow, without a cycle.
    meets_after: dict[tuple, set] = {}
    for rank, links in enumerate(first_links):
        pairs = [(group, tuple(sorted((rank, peer)))) for group, peer in links]
        for earlier, later in zip(pairs, pairs[1:]):
            meets_after.setdefault(later, set()).add(earlier)
    assert list(TopologicalSorter(meets_after).static_order())


_SILENT_PEER_RANK = """
import os, sys, time
from datetime import timedelta
import torch, torch.distributed as dist
from devicemap.pipeline.wire import PeerLostError, StageLinks

rank, world_size = int(sys.argv[1]), int(sys.argv[2])
dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
links = StageLinks(rank, world_size, torch.device("cpu"), timeout_s=2)
if rank == 0:
    time.sleep(30)  # alive, links open, but it never sends
else:
    links.expect_hidden(1, 3, 8, torch.float32)
    started = time.monotonic()
    try:
        links.recv_hidden()
    except PeerLostError as error:
        print(f"{error.peer} {time.monotonic() - started:.1f} {error}", flush=True)
    os._exit(0)  # as a worker ends after reporting: no goodbye to a peer that will not answer
"""


def test_a_peer_that_stops_sending_is_named_in_a_peer_lost_error_once_the_timeout_passes():
    silent, waiting = _start_ranks(_SILENT_PEER_RANK, 2)
    try:
        (line,) = _last_lines([waiting], limit_s=60)
    finally:
        silent.kill()
        silent.wait()
    peer, waited_s, message = line.split(" ", 2)
    assert peer == "0" and 1.5 < float(waited_s) < 10
    assert message == "rank 1 stopped while receiving hidden states from rank 0: no answer within the 2 s timeout"


@pytest.mark.parametrize(
    ("said", "reason"),
    [
        ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete",
         "no answer within the 3 s timeout"),
        ("[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=4, OpType=RECV, NumelIn=9, "
         "NumelOut=9, Timeout(ms)=3000) ran for 3001 milliseconds before timing out.",
         "no answer within the 3 s timeout"),
        ("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41002",
         "its connection closed, so it has stopped or died"),
        ("NCCL error: remote process exited or there was a network error, NCCL version 2.27.3\n"
         "ncclRemoteError: A call failed possibly due to a network error or a remote process exiting prematurely.",
         "its connection closed, so it has stopped or died"),
        ("NCCL communicator was aborted on rank 1.", "NCCL communicator was aborted on rank 1."),
    ],
)  # fmt: skip
def test_gloo_and_nccl_failures_become_peer_lost_errors_naming_the_peer_and_the_cause(said, reason):
    error = peer_lost(1, 0, "receiving hidden states from", RuntimeError(said), timeout_s=3)
    assert isinstance(error, PeerLostError) and error.peer == 0
    assert str(error) == f"rank 1 stopped while receiving hidden states from rank 0: {reason}"


def test_the_links_groups_are_made_with_nccl_errors_left_to_the_waits_and_the_setting_is_restored(monkeypatch):
    monkeypatch.setenv(_NCCL_ERROR_HANDLING, "3")
    with _errors_raised_by_waits():
        assert os.environ[_NCCL_ERROR_HANDLING] == "0"
    assert os.environ[_NCCL_ERROR_HANDLING] == "3"
    monkeypatch.delenv(_NCCL_ERROR_HANDLING)
    with pytest.raises(KeyError), _errors_raised_by_waits():
        {}["raised inside"]
    assert _NCCL_ERROR_HANDLING not in os.environ


# Streaming: buffers the copy thread may write, originals freed while packing, slots as planned.


def _write_on_another_thread(target: torch.Tensor, source: torch.Tensor) -> BaseException | None:
    """Copy ``source`` into ``target`` on a fresh thread, as the prefetch thread does; what it raised."""
    raised = []

    def copy():
        try:
            target.copy_(source)
        except BaseException as error:
            raised.append(error)

    thread = threading.Thread(target=copy)
    thread.start()
    thread.join()
    return raised[0] if raised else None


def test_buffers_made_inside_inference_mode_are_written_by_the_copy_thread():
    source = torch.arange(64, dtype=torch.uint8)
    with torch.inference_mode():
        as_the_caller_would = torch.empty(64, dtype=torch.uint8)
        staging = _host_bytes(64)
        view = staging[16:48]  # a staging view, as routes take them
    assert "inference" in str(_write_on_another_thread(as_the_caller_would, source)), "the failure this guards against"
    assert _write_on_another_thread(staging, source) is None
    assert _write_on_another_thread(view, source[:32]) is None
    assert torch.equal(staging[16:48], source[:32])


def test_host_buffers_are_made_on_the_cpu_whatever_the_default_device():
    with torch.device("meta"):
        buffer = _host_bytes(16)
    assert buffer.device.type == "cpu" and buffer.nbytes == 16


class _WatchedOwner(dict):
    """A module's ``_parameters`` that notes, at each replacement, which originals are still alive."""

    def __init__(self, parameters: dict):
        super().__init__(parameters)
        self.originals = [weakref.ref(parameter) for parameter in parameters.values()]
        self.alive_at_each_swap: list[list[bool]] = []

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self.alive_at_each_swap.append([original() is not None for original in self.originals])


def test_packing_a_block_frees_each_original_as_soon_as_its_copy_replaces_it():
    owner = _WatchedOwner({name: nn.Parameter(torch.randn(100), requires_grad=False) for name in "abc"})
    expected = {name: parameter.clone() for name, parameter in owner.items()}
    parameters = tuple((owner, name) for name in "abc")
    offsets, size_bytes = aligned_offsets([owner[name] for name in "abc"])
    _pack_into(_host_bytes(size_bytes), parameters, offsets)
    assert owner.alive_at_each_swap == [[False, True, True], [False, False, True], [False, False, False]]
    assert all(torch.equal(owner[name], expected[name]) for name in "abc")
    assert owner["a"].untyped_storage().data_ptr() == owner["c"].untyped_storage().data_ptr(), "one buffer"


def _streamed_block(model: nn.Module, name: str, pack: bool) -> StreamedBlock:
    """Every parameter under module ``name``, streamed as dispatch streams it."""
    block = model.get_submodule(name)
    parameters = [
        (module._parameters, key) for module in block.modules() for key, _ in module.named_parameters(recurse=False)
    ]
    return StreamedBlock(name, tuple(parameters), pack)


@pytest.mark.parametrize("prefetch_depth", [1, 2, 5])
@pytest.mark.parametrize("stored", ["cpu", "disk"])
def test_streaming_slots_never_take_more_than_the_plan_reserves(prefetch_depth, stored):
    model = build_random_model("llama")
    streamed = [f"model.layers.{i}" for i in range(1, 6)]
    blocks = [_streamed_block(model, name, pack=stored == "cpu") for name in streamed]
    layout = slot_layout(blocks, slot_count=prefetch_depth + 1)  # what dispatch asks for
    largest = max(block.weight_bytes for block in profile_module(model).blocks if block.name in streamed)
    reserved = STREAM_COPIES * (largest + 255 * max(len(block.parameters) for block in blocks))  # with alignment
    assert layout.count == STREAM_COPIES
    assert 0 < layout.count * layout.slot_bytes <= reserved
    assert layout.count * layout.staging_bytes == (layout.count * layout.slot_bytes if stored == "disk" else 0)


def test_teardown_waits_for_every_copy_still_queued_or_running_and_ignores_their_errors():
    finished = []

    def slow_copy():
        time.sleep(0.3)
        finished.append(True)

    def failed_copy():
        raise RuntimeError("a copy nobody will use")

    with ThreadPoolExecutor(1) as executor:
        copies = [executor.submit(slow_copy), None, executor.submit(failed_copy)]
        _wait_for(copies)
        assert finished == [True] and all(copy is None or copy.done() for copy in copies)


# On a GPU: the same paths, run for real.


def _llama_map(stored: str, layers=range(1, 6)) -> dict:
    others = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 0, "lm_head": 0}
    return {**others, **{f"model.layers.{i}": stored if i in layers else 0 for i in range(6)}}


def _assert_generates_like_the_plain_model_on_gpu(model, folder) -> None:
    reference = AutoModelForCausalLM.from_pretrained(folder).to("cuda:0")
    ids = IDS.to("cuda:0")
    expected = reference.generate(ids, max_new_tokens=8, do_sample=False)
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), expected)


@gpu
@needs_cuda
@pytest.mark.parametrize("stored", ["cpu", "disk"])
def test_a_model_loaded_inside_inference_mode_generates_with_streamed_blocks(stored, random_model_folder, tmp_path):
    folder = random_model_folder("llama")
    with torch.inference_mode():
        model = load(folder, device_map=_llama_map(stored), offload_folder=tmp_path)
    _assert_generates_like_the_plain_model_on_gpu(model, folder)


@gpu
@needs_cuda
def test_dispatching_a_module_already_on_a_gpu_with_a_block_on_disk_generates_its_tokens(random_model_folder, tmp_path):
    folder = random_model_folder("llama")
    model = AutoModelForCausalLM.from_pretrained(folder).to("cuda:0")
    dispatch(model, _llama_map("disk", layers=[3]), offload_folder=tmp_path)
    assert model.model.layers[3].self_attn.q_proj.weight.device.type == "cpu", "kept in its file, streamed in"
    _assert_generates_like_the_plain_model_on_gpu(model, folder)


def _lag_copies(monkeypatch) -> None:
    """Every copy into a slot starts ``LAG_CYCLES`` late on the copy stream: a compute that read a
    slot without waiting for its copy would read the previous block's weights."""
    copy = AcceleratorStreamer._copy

    def late_copy(self, route):
        with torch.cuda.device(self.device), torch.cuda.stream(self._copy_stream):
            torch.cuda._sleep(LAG_CYCLES)
        copy(self, route)

    monkeypatch.setattr(AcceleratorStreamer, "_copy", late_copy)


def _lag_compute(monkeypatch) -> None:
    """Every block computes ``LAG_CYCLES`` late: a copy that overwrote a slot before the compute
    reading it was done would hand that compute the next block's weights."""
    bind = AcceleratorStreamer.bind

    def late_bind(self, name):
        bind(self, name)
        torch.cuda._sleep(LAG_CYCLES)

    monkeypatch.setattr(AcceleratorStreamer, "bind", late_bind)


@gpu
@needs_cuda
@pytest.mark.parametrize("lagging", [_lag_copies, _lag_compute], ids=["copies-lag", "compute-lags"])
@pytest.mark.parametrize("stored", ["cpu", "disk"])
def test_streamed_blocks_generate_the_plain_models_tokens_when_copies_or_compute_lag(
    lagging, stored, random_model_folder, tmp_path, monkeypatch
):
    lagging(monkeypatch)
    folder = random_model_folder("llama")
    model = load(folder, device_map=_llama_map(stored), offload_folder=tmp_path)
    _assert_generates_like_the_plain_model_on_gpu(model, folder)


@gpu
@needs_cuda
def test_a_streamer_going_away_waits_for_the_copy_it_started_before_its_memory_is_freed(
    random_model_folder, monkeypatch
):
    _lag_copies(monkeypatch)
    model = load(random_model_folder("llama"), device_map=_llama_map("cpu"))
    with torch.inference_mode():
        model(input_ids=IDS.to("cuda:0"))  # ends with the next step's first block being fetched ahead
    copy_stream = model.__dict__["_devicemap_dispatch"].fetchers["model.layers.1"]._copy_stream
    remove_dispatch(model)
    gc.collect()
    assert copy_stream.query(), "the late copy was waited for before the slots were freed"


@gpu
@needs_two_gpus
def test_two_nccl_stages_generate_what_transformers_generates(random_model_folder):
    from devicemap.pipeline import Pipeline

    folder = random_model_folder("llama")
    reference = AutoModelForCausalLM.from_pretrained(folder).to("cuda:0")
    ids = torch.tensor([[5, 17, 300, 42, 9], [0, 0, 0, 7, 8]])
    mask = (ids != 0).long()
    with Pipeline(folder, stages=2, device="cuda", timeout_s=60) as pipe:
        output = pipe.generate(ids, mask, max_new_tokens=6)
    with torch.inference_mode():
        expected = reference.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=6,
                                      do_sample=False)  # fmt: skip
    assert torch.equal(output, expected.cpu())
