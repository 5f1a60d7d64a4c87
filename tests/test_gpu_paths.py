"""The CUDA paths: NCCL links that open without crossing, lost peers named, streamed blocks safe.

What decides whether these paths work is mostly ordering: which handshake each rank
joins first, which stream waits for which, which thread may write which buffer. That
logic runs here on the CPU (gloo ranks, plain threads, real models); the tests marked
``gpu`` run the same paths on a CUDA device (``python -m benchmarks gpu`` runs them all).
"""

import json
import os
import socket
import subprocess
import sys
from graphlib import TopologicalSorter

import pytest
import torch
from transformers import AutoModelForCausalLM

from devicemap.pipeline.wire import _NCCL_ERROR_HANDLING, PeerLostError, _errors_raised_by_waits, peer_lost

gpu = pytest.mark.gpu
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


# NCCL links: the first handshake of every pair, in an order no two ranks can cross.

_RECORDING_RANK = """
import json, sys
from datetime import timedelta
import torch, torch.distributed as dist
from devicemap.pipeline.schedule import Request, run_request
from devicemap.pipeline.stage_model import build_stage
from devicemap.pipeline.wire import StageLinks
from devicemap.planning.api import profile_of
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


# On a GPU: the same paths, run for real.


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
