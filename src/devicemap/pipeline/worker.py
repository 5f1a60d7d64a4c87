"""One pipeline rank: join the process group, build this rank's stage, run requests.

The same code runs under devicemap's own launcher (``python -m devicemap.pipeline``,
requests arriving as JSON lines on a pipe from the launcher) and under ``torchrun``
(inside ``devicemap generate``, one request from the command line). Either way the rank
reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from
the environment and joins with ``init_process_group(init_method="env://")``: gloo on CPU,
NCCL on CUDA, every collective bounded by the pipeline's timeout.

Trust: ranks exchange only tensors (see ``wire``) and the launcher's pipes carry
JSON, so nothing is unpickled. The rendezvous store (torch's TCPStore) accepts any client
that reaches its port, and a rank believes the hidden states its peers send: every rank of
one job, and every host on the network the store and the ranks listen on, must be trusted.
"""

import argparse
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import timedelta

import psutil
import torch
import torch.distributed as dist

from ..devices import cuda_runtime_reserve, free_memory
from ..errors import DeviceMapError, PipelineError
from ..planning.stages import StagePlan, split_stages
from ..runtime.api import profile_of
from ..units import format_size
from ..workload import Workload
from .schedule import Request, run_request
from .stage_model import StageModel, build_stage
from .wire import PeerLostError, StageLinks

_PARENT_CHECK_S = 0.5

# NCCL's buffers, which a CUDA rank holds beside the runtime reserve of any process computing on
# its GPU (``devices.CUDA_RUNTIME_RESERVE_BYTES``: its context's kernels, cuBLAS workspaces, the
# allocator's rounding): NCCL_BUFFSIZE, 4 MiB per channel per peer and direction; a stage sends
# to one neighbour and receives from the other, and the ranks' all-gather rings them all, on up
# to 16 channels each: (2 + 2 + 2) x 16 x 4 MiB = 384 MiB.
NCCL_BUFFER_BYTES = 6 * 16 * 4 * 2**20


def rank_cuda_reserve() -> int:
    """What a CUDA rank holds on its GPU beside its stage: the runtime reserve and NCCL's buffers.

    >>> rank_cuda_reserve() == cuda_runtime_reserve() + NCCL_BUFFER_BYTES
    True
    """
    return cuda_runtime_reserve() + NCCL_BUFFER_BYTES


def budget_beside_rank(free_bytes: int) -> int:
    """What a CUDA rank's stage may use of its GPU's measured free memory: all but :func:`rank_cuda_reserve`.

    The measurement already counts one bare CUDA context (``devices.free_gpu_memory``, or the
    rank's own under torchrun).

    >>> budget_beside_rank(9 * 2**30) == 9 * 2**30 - rank_cuda_reserve(), budget_beside_rank(2**20)
    (True, 0)
    """
    return max(0, free_bytes - rank_cuda_reserve())


def describe_reserve(measured_ranks: Sequence[int]) -> str:
    """The stage plan's reason line for the room CUDA ranks keep beside their stage."""
    kept = (
        f"{format_size(rank_cuda_reserve())} for what a rank holds beside its stage (the kernels its CUDA "
        "context loads, the allocator's rounding, cuBLAS workspaces, NCCL buffers)"
    )
    if not measured_ranks:
        return f"every GPU rank's budget was given and is its stage's alone: leave {kept} beside it on each GPU"
    ranks = ", ".join(map(str, measured_ranks))
    return (
        f"GPU rank(s) {ranks} keep {kept} out of the free memory measured; budgets given in max_memory are "
        "the stage's alone"
    )


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a rank needs to build its stage, the same for every rank of a job.

    ``blocks`` holds each rank's profile blocks when the launcher already planned the
    stages, and ``offloaded`` each rank's (block, "cpu" or "disk") pairs; ``None`` makes
    the ranks plan them together from the free memory each rank measures and shares,
    replaced by ``budgets`` ((rank, bytes) pairs) where given, each rank offering its free
    host memory and disk for offload when ``offload`` is on. ``device`` is "cpu" (gloo)
    or "cuda" (NCCL, rank on GPU ``LOCAL_RANK``). ``trust_remote_code`` lets the ranks run
    the modeling code the model folder ships.
    """

    model: str
    stages: int
    dtype: str | None
    workload: Workload
    timeout_s: float
    device: str = "cpu"
    threads: int | None = None
    budgets: tuple[tuple[int, int], ...] = ()
    blocks: tuple[tuple[str, ...], ...] | None = None
    offloaded: tuple[tuple[tuple[str, str], ...], ...] = ()
    offload: bool = True
    offload_folder: str | None = None
    trust_remote_code: bool = False

    def offloaded_of(self, rank: int) -> dict[str, str]:
        """Rank ``rank``'s offloaded blocks and their tier, as the launcher planned them."""
        return dict(self.offloaded[rank]) if self.offloaded else {}

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        fields = json.loads(text)
        fields["workload"] = Workload(**fields["workload"])
        fields["budgets"] = tuple(tuple(pair) for pair in fields["budgets"])
        if fields["blocks"] is not None:
            fields["blocks"] = tuple(tuple(blocks) for blocks in fields["blocks"])
        fields["offloaded"] = tuple(tuple(tuple(pair) for pair in pairs) for pairs in fields["offloaded"])
        return cls(**fields)


@dataclass(frozen=True)
class Rank:
    """A joined rank with its stage and links, ready for requests.

    ``stage_plan`` is the plan the ranks made together, or None when the launcher made it.
    """

    rank: int
    world_size: int
    stage: StageModel
    links: StageLinks
    stage_plan: StagePlan | None = None

    def generate(self, request: Request) -> torch.Tensor | None:
        """Run one request with the other ranks; rank 0 returns the new tokens."""
        return run_request(self.stage, self.links, request)


def join(spec: WorkerSpec) -> Rank:
    """Join the job the environment describes and build this rank's stage."""
    rank, world_size, local_rank = _environment_ranks(spec)
    if spec.device == "cuda":
        # device_count asks the driver (or NVML) only: no context is created yet.
        ranks_here = int(os.environ["LOCAL_WORLD_SIZE"]) if os.environ.get("LOCAL_WORLD_SIZE") else None
        check_gpu_of_rank(rank, local_rank, ranks_here, torch.cuda.device_count())
    if spec.threads:
        torch.set_num_threads(spec.threads)
    device = torch.device(f"cuda:{local_rank}") if spec.device == "cuda" else torch.device("cpu")
    timeout = timedelta(seconds=spec.timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method="env://", timeout=timeout, device_id=device)
    else:
        dist.init_process_group("gloo", init_method="env://", timeout=timeout)
    stage_plan = None if spec.blocks is not None else _plan_together(spec, device)
    if stage_plan is None:
        blocks, offloaded = spec.blocks[rank], spec.offloaded_of(rank)
    else:
        blocks, offloaded = stage_plan.blocks_of(rank), dict(stage_plan.stages[rank].offloaded)
    dtype = getattr(torch, spec.dtype) if spec.dtype else None
    stage = build_stage(spec.model, blocks, device, dtype, offloaded, spec.offload_folder, spec.trust_remote_code)
    return Rank(rank, world_size, stage, StageLinks(rank, world_size, device, spec.timeout_s), stage_plan)


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _environment_ranks(spec: WorkerSpec) -> tuple[int, int, int]:
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise PipelineError(
            f"a pipeline rank needs {', '.join(missing)} in its environment; start it with torchrun or "
            "with devicemap's own launcher (devicemap generate --pipeline N, or devicemap.pipeline.Pipeline)"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world_size != spec.stages:
        raise PipelineError(
            f"the job has {world_size} ranks but the pipeline asks for {spec.stages} stages; "
            f"start as many ranks as stages (torchrun --nproc-per-node/--nnodes, or --pipeline {world_size})"
        )
    return rank, world_size, int(os.environ.get("LOCAL_RANK", rank))


def check_gpu_of_rank(rank: int, local_rank: int, local_world_size: int | None, gpus: int) -> None:
    """Refuse, before CUDA is touched, a rank whose GPU ``LOCAL_RANK`` is missing or shared with another rank.

    ``gpus`` is how many GPUs this process sees; ``local_world_size`` how many ranks this
    machine runs (torchrun's ``LOCAL_WORLD_SIZE``), None when unknown. Without the check the
    rank fails with CUDA's bare "invalid device ordinal", or two ranks fight over one GPU.

    >>> check_gpu_of_rank(rank=5, local_rank=1, local_world_size=2, gpus=2)
    """
    if local_rank < gpus and (local_world_size is None or local_world_size <= gpus):
        return
    problem = (
        f"its LOCAL_RANK {local_rank} names no GPU"
        if local_rank >= gpus
        else f"LOCAL_WORLD_SIZE {local_world_size} ranks on this machine would share its GPUs"
    )
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise PipelineError(
        f"rank {rank} (LOCAL_RANK {local_rank}, LOCAL_WORLD_SIZE {local_world_size or 'not set'}) cannot have a GPU "
        f"of its own: this process sees {gpus} GPU(s)"
        + ("" if visible is None else f" (CUDA_VISIBLE_DEVICES={visible!r})")
        + f", and {problem}; start at most {gpus} rank(s) per machine (torchrun --nproc-per-node at most {gpus}), "
        "make more GPUs visible with CUDA_VISIBLE_DEVICES, or run the pipeline on CPU (device='cpu', or "
        "CUDA_VISIBLE_DEVICES= under torchrun)"
    )


def _plan_together(spec: WorkerSpec, device: torch.device) -> StagePlan:
    """Every rank shares its budget and computes the same plan from the same numbers."""
    gathered = _gather_memory(_local_memory(device, spec.offload_folder), spec.stages, device)
    budgets = [budget for budget, _, _ in gathered]
    for given_rank, budget in spec.budgets:
        budgets[given_rank] = budget
    offload = None
    if spec.offload:
        # A CPU rank's own memory is its budget already: it offers only its disk.
        offload = [{"disk": disk} if device.type == "cpu" else {"cpu": cpu, "disk": disk} for _, cpu, disk in gathered]
    profile = profile_of(spec.model, spec.dtype, trust_remote_code=spec.trust_remote_code)
    stage_plan = split_stages(profile, budgets, spec.workload, offload, device.type)
    if device.type != "cuda":
        return stage_plan
    measured = [rank for rank in range(spec.stages) if rank not in dict(spec.budgets)]
    return replace(stage_plan, reasons=stage_plan.reasons + (describe_reserve(measured),))


def _local_memory(device: torch.device, offload_folder: str | None) -> tuple[int, int, int]:
    """This rank's device budget and its share of this machine's free host memory and disk."""
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    host = psutil.virtual_memory().available // ranks_here
    disk = free_memory("disk", offload_folder) // ranks_here
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return budget_beside_rank(free), host, disk
    return host, 0, disk


def _gather_memory(memory: tuple[int, int, int], stages: int, device: torch.device) -> list[tuple[int, int, int]]:
    mine = torch.tensor(memory, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(stages)]
    dist.all_gather(everyone, mine)
    return [tuple(int(number) for number in value.tolist()) for value in everyone]


def serve(rank: Rank, control, reply) -> None:
    """Answer the launcher's requests, one JSON line each, until it says close or goes away."""
    for line in control:
        message = json.loads(line)
        if message["op"] == "close":
            return
        started = time.perf_counter()
        tokens = rank.generate(Request.from_json(message["request"]))
        seconds = time.perf_counter() - started
        _send(reply, {"done": {"tokens": None if tokens is None else tokens.tolist(), "seconds": seconds}})


def _send(reply, message: dict) -> None:
    reply.write(json.dumps(message) + "\n")
    reply.flush()


def _report(reply, error: BaseException) -> None:
    """Tell the launcher why this rank stops: a lost peer, or the cause itself."""
    if isinstance(error, PeerLostError):
        report = {"kind": "peer", "peer": error.peer, "message": str(error)}
    elif isinstance(error, DeviceMapError):
        report = {"kind": "cause", "message": str(error)}
    else:
        traceback.print_exception(error, file=sys.stderr)  # the whole story, for whoever debugs it
        report = {"kind": "cause", "message": f"{type(error).__name__}: {error}{_where(error)}"}
    try:
        _send(reply, {"error": report})
    except OSError:
        pass  # the launcher is gone; it cannot be told


def _where(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""


def _watch_parent(parent_pid: int) -> None:
    """Exit as soon as the launcher is gone, even in the middle of a request."""

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="devicemap-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    """Entry point of a rank started by devicemap's launcher."""
    parser = argparse.ArgumentParser(prog="python -m devicemap.pipeline")
    parser.add_argument("--spec", required=True, help="the WorkerSpec as JSON")
    parser.add_argument("--control-fd", type=int, required=True, help="pipe the launcher writes requests to")
    parser.add_argument("--reply-fd", type=int, required=True, help="pipe this rank writes answers to")
    parser.add_argument("--parent-pid", type=int, required=True, help="the launcher's process id")
    args = parser.parse_args(argv)
    _watch_parent(args.parent_pid)
    reply = os.fdopen(args.reply_fd, "w")
    try:
        with os.fdopen(args.control_fd, "r") as control:
            rank = join(WorkerSpec.from_json(args.spec))
            _send(reply, {"ready": {"rank": rank.rank}})
            serve(rank, control, reply)
        leave()
    except BaseException as error:  # every failure must reach the launcher, then end this rank at once
        _report(reply, error)
        os._exit(1)
    reply.close()
