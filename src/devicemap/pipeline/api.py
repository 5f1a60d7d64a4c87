"""Pipeline-parallel generation: one process per device, every device busy at once.

A device map runs one device at a time; a pipeline gives each rank (a process owning one
GPU, or a CPU process) one contiguous stage of the model, sized with the planner's
ledger (weights, KV cache and activations for the workload, per rank budget), and
streams micro-batches through the stages so that all of them compute at once. Each rank
reads only its own stage's tensors from the checkpoint folder.

    with Pipeline("path/to/model", stages=2) as pipe:          # starts 2 processes here
        print(pipe.stage_plan)
        texts = pipe.generate_text(["What is machine learning?", "Hi"], max_new_tokens=32)

    devicemap generate MODEL "What is machine learning?" --pipeline 2
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-endpoint HOST:29500 -m devicemap generate MODEL "..." --pipeline 8

Greedy output is token for token that of the model's own ``generate`` on the same padded
batch and dtype; sampling with a seed is reproducible.

Trust: ranks exchange tensors only, and the launcher's pipes carry JSON, so nothing
received is unpickled. The launcher binds the rendezvous store and gloo to 127.0.0.1 by
default. Across machines, torchrun's store accepts any client that reaches its port and
ranks believe the tensors peers send, so every host of the job, and the network between
them, must be trusted.
"""

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
import torch
from transformers import AutoTokenizer

from ..devices import free_gpu_memory, free_memory
from ..errors import DeviceMapError, PipelineError
from ..model.skeleton import load_config
from ..planning.stages import RankBudgets, StagePlan, parse_rank_budgets, split_stages
from ..runtime.api import profile_of
from ..runtime.prompts import tokenize
from ..storage.reference import model_folder
from ..units import parse_size
from ..workload import Workload, dtype_name
from .launch import Workers
from .requests import build_request
from .schedule import Sampling
from .stage_model import check_supported
from .worker import WorkerSpec, budget_beside_rank, describe_reserve, join, leave

DEFAULT_TIMEOUT_S = 300.0


def plan_stages(
    model: str | os.PathLike,
    stages: int,
    *,
    dtype: torch.dtype | str | None = None,
    max_memory: RankBudgets | None = None,
    workload: Workload | None = None,
    device: str = "auto",
    offload: bool | Sequence[Mapping[str, int | str]] = True,
    offload_folder: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
) -> StagePlan:
    """Plan which blocks each of ``stages`` ranks holds, from the config alone.

    ``max_memory`` gives ranks' budgets ("0=8GiB,1=16GiB", a dict or a list), each its stage's
    alone, for GPUs this machine need not have; ranks it leaves out get this machine's free
    memory: GPU ``rank``'s less ``worker.rank_cuda_reserve()`` for what the rank itself holds
    there (a reason line of the plan says so), or an equal share of RAM. Planning needs no
    GPU beyond those it measures; only starting the pipeline needs one GPU per stage.
    When no split fits, ranks offload the tail of their stage (``offload``): to an equal
    share of this machine's free RAM (GPU ranks) and of the disk under ``offload_folder``,
    or, per rank, to the sizes ``offload`` gives (e.g. ``[{}, {"disk": "4GiB"}]``).
    ``trust_remote_code`` reads a model that ships its own modeling code.

    >>> from devicemap.model.profile import Block, Profile
    >>> blocks = tuple(Block(name, 2**20) for name in ("embed", "layers.0", "layers.1", "layers.2", "head"))
    >>> plan = plan_stages(Profile("tiny", "float32", blocks, head="head"), 2, max_memory=[2**30] * 2, device="cpu")
    >>> plan.blocks_of(0), plan.blocks_of(1)
    (('embed', 'layers.0', 'layers.1'), ('layers.2', 'head'))
    """
    kind = _device_kind(device, stages)
    given = parse_rank_budgets(max_memory, stages)
    budgets = _rank_budgets(given, stages, kind)
    allowances = _offload_allowances(offload, stages, kind, offload_folder)
    profile = profile_of(model, dtype, trust_remote_code=trust_remote_code)
    stage_plan = split_stages(profile, budgets, workload, allowances, kind)
    if kind != "cuda":
        return stage_plan
    reserve = describe_reserve([rank for rank in range(stages) if rank not in given])
    return replace(stage_plan, reasons=stage_plan.reasons + (reserve,))


class Pipeline:
    """A model split into ``stages`` worker processes on this machine, loaded once, serving many calls.

    ``device`` is "cpu" (gloo, one process per stage), "cuda" (NCCL, rank r on GPU r) or
    "auto" (CUDA when this machine has a GPU). ``offload`` and ``offload_folder`` are as for
    :func:`plan_stages`: a rank keeps what its budget cannot hold in its RAM or on disk.
    ``threads_per_stage`` defaults to an equal share of the CPU cores for CPU stages. A rank
    that fails, dies, or stops answering for ``timeout_s`` stops the whole pipeline with a
    :class:`PipelineError` naming it. ``model`` is a folder, or a Hub id fetched at ``revision``
    as :func:`devicemap.load` fetches it; ``trust_remote_code`` lets the ranks run the modeling
    code it ships, which is refused, before any process starts, without it.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        stages: int = 2,
        dtype: torch.dtype | str | None = None,
        max_memory: RankBudgets | None = None,
        workload: Workload | None = None,
        device: str = "auto",
        threads_per_stage: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        master_addr: str = "127.0.0.1",
        offload: bool | Sequence[Mapping[str, int | str]] = True,
        offload_folder: str | os.PathLike | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
    ):
        if threads_per_stage is not None and threads_per_stage < 1:
            raise DeviceMapError(f"threads_per_stage {threads_per_stage} must be at least 1")
        if not timeout_s > 0:
            raise DeviceMapError(f"timeout_s {timeout_s} must be more than 0 seconds")
        kind = _device_kind(device, stages)
        if kind == "cuda":
            check_gpus_for(stages, torch.cuda.device_count())
        self.model = model_folder(model, revision, trust_remote_code)
        self.trust_remote_code = trust_remote_code
        self.config = load_config(self.model, trust_remote_code)
        check_supported(self.config)
        self.stage_plan = plan_stages(
            self.model, stages, dtype=dtype, max_memory=max_memory, workload=workload, device=device,
            offload=offload, offload_folder=offload_folder, trust_remote_code=trust_remote_code,
        )  # fmt: skip
        spec = WorkerSpec(
            model=str(self.model),
            stages=stages,
            dtype=self.stage_plan.profile.dtype,
            workload=self.stage_plan.workload,
            timeout_s=timeout_s,
            device=kind,
            threads=threads_per_stage or (max(1, (os.cpu_count() or 1) // stages) if kind == "cpu" else None),
            blocks=tuple(stage.blocks for stage in self.stage_plan.stages),
            offloaded=tuple(stage.offloaded for stage in self.stage_plan.stages),
            offload=offload is not False,
            offload_folder=None if offload_folder is None else str(offload_folder),
            trust_remote_code=trust_remote_code,
        )
        self._workers = Workers(spec, master_addr)
        self._workers.wait_ready()
        self._tokenizer = None

    @property
    def pids(self) -> tuple[int, ...]:
        """The worker processes' ids, rank order."""
        return self._workers.pids

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]],
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        micro_batches: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        **sampling,
    ) -> torch.Tensor:
        """Continue a batch of prompts; returns [batch, prompt + new tokens], left-padded, like ``generate``.

        ``input_ids`` is a padded tensor with its ``attention_mask`` (left or right padding;
        rows are re-aligned to the left) or a list of token lists of any lengths.
        ``sampling``: ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``.
        ``eos_token_id`` defaults to the model's; ``[]`` generates ``max_new_tokens`` for every row.
        ``micro_batches`` defaults to the number of stages.
        """
        request = build_request(
            input_ids, attention_mask, model=self.model, config=self.config, max_new_tokens=max_new_tokens,
            micro_batches=micro_batches or len(self.stage_plan.stages), sampling=Sampling(**sampling),
            eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        )  # fmt: skip
        new_tokens = torch.tensor(self._workers.generate(request), dtype=torch.int64)
        return torch.cat([request.input_ids, new_tokens], dim=1)

    def generate_text(
        self, prompts: Sequence[str], *, max_new_tokens: int = 20, chat: bool = False, **options
    ) -> list[str]:
        """Generate a continuation of each prompt; ``chat`` wraps them in the model's chat template."""
        tokenizer = self.tokenizer
        inputs = tokenize(tokenizer, prompts, chat)
        output = self.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens, **options)
        return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    @property
    def tokenizer(self):
        """The model folder's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model, trust_remote_code=self.trust_remote_code)
        return self._tokenizer

    def close(self) -> None:
        """Stop every worker process and reap it."""
        self._workers.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def generate(
    model: str | os.PathLike, prompts: Sequence[str], *, stages: int = 2, max_new_tokens: int = 20, **options
) -> list[str]:
    """Start a pipeline, generate a continuation of each prompt, stop it.

    ``options`` go to :class:`Pipeline` (``dtype``, ``max_memory``, ``device``, ``timeout_s``…)
    or to :meth:`Pipeline.generate_text` (``chat``, ``do_sample``, ``seed``…).
    """
    pipeline_options = {key: options.pop(key) for key in _PIPELINE_OPTIONS if key in options}
    if "workload" not in pipeline_options:
        pipeline_options["workload"] = Workload(len(prompts))
    with Pipeline(model, stages=stages, **pipeline_options) as pipe:
        return pipe.generate_text(prompts, max_new_tokens=max_new_tokens, **options)


_PIPELINE_OPTIONS = (
    "dtype", "max_memory", "workload", "device", "threads_per_stage", "timeout_s", "master_addr", "offload",
    "offload_folder", "revision", "trust_remote_code",
)  # fmt: skip


def _device_kind(device: str, stages: int) -> str:
    if stages < 1:
        raise PipelineError(f"a pipeline needs at least 1 stage, not {stages}")
    kind = device.strip().lower()
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "cuda"):
        raise PipelineError(f"pipeline device {device!r} is not understood; use 'auto', 'cuda' or 'cpu'")
    return kind


def check_gpus_for(stages: int, gpus: int) -> None:
    """Refuse to start ``stages`` CUDA ranks on a machine with fewer GPUs; planning them needs none.

    >>> check_gpus_for(2, 4)
    """
    if gpus < stages:
        raise PipelineError(
            f"{stages} stages on CUDA need {stages} GPUs on this machine, which has {gpus}; "
            "use fewer stages, device='cpu', or torchrun across machines"
        )


def _rank_budgets(given: dict[int, int], stages: int, kind: str) -> list[int]:
    """Each rank's budget: the one given, else what its GPU has free beside the rank's own needs, or a share of RAM."""
    missing = [rank for rank in range(stages) if rank not in given]
    if kind == "cpu":
        return [given.get(rank, psutil.virtual_memory().available // stages) for rank in range(stages)]
    check_ranks_measurable(missing, torch.cuda.device_count())
    budgets = given | {rank: budget_beside_rank(free) for rank, free in free_gpu_memory(missing).items()}
    return [budgets[rank] for rank in range(stages)]


def check_ranks_measurable(ranks: Sequence[int], gpus: int) -> None:
    """Refuse ranks with no budget given whose GPU this machine lacks: only a GPU that exists can be measured.

    >>> check_ranks_measurable([0, 1], gpus=2)
    """
    beyond = [rank for rank in ranks if rank >= gpus]
    if beyond:
        names = ", ".join(map(str, beyond))
        raise PipelineError(
            f"rank(s) {names} have no budget in max_memory, and this machine has {gpus} GPU(s) to measure "
            f"(GPU r for rank r); give their budgets (e.g. '{beyond[0]}=24GiB') to plan for GPUs this machine lacks"
        )


def _offload_allowances(offload, stages: int, kind: str, offload_folder) -> list[dict[str, int]] | None:
    """The sizes given per rank; else each rank's equal share of this machine's free disk, and RAM for GPU ranks."""
    if offload is False:
        return None
    if offload is not True:
        if len(offload) != stages:
            raise PipelineError(f"offload gives {len(offload)} ranks' allowances for {stages} stages; give one per rank")
        return [{tier: parse_size(size) for tier, size in allowance.items()} for allowance in offload]
    disk = free_memory("disk", offload_folder) // stages
    if kind == "cpu":
        # A CPU rank's RAM is its budget already.
        return [{"disk": disk}] * stages
    return [{"cpu": free_memory("cpu") // stages, "disk": disk}] * stages


@dataclass(frozen=True)
class RankOutput:
    """Rank 0's answer in a torchrun job: the new tokens, the stages the ranks planned, the seconds generating took."""

    new_tokens: torch.Tensor
    stage_plan: StagePlan
    seconds: float


def generate_as_rank(
    model: str | os.PathLike,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    stages: int,
    max_new_tokens: int,
    dtype: torch.dtype | str | None = None,
    max_memory: RankBudgets | None = None,
    trust_remote_code: bool = False,
) -> RankOutput | None:
    """Join the torchrun job the environment describes as one of its ``stages`` ranks and continue the prompts.

    Every rank passes the same left-padded prompts; the ranks plan their stages together from
    the memory each has free (``max_memory`` overrides ranks' budgets). Rank 0 gets the new
    tokens back, the other ranks None. ``trust_remote_code`` lets them run the code the model ships.
    """
    config = load_config(model, trust_remote_code)
    request = build_request(
        input_ids, attention_mask, model=Path(model), config=config, max_new_tokens=max_new_tokens,
        micro_batches=stages, sampling=Sampling(),
    )  # fmt: skip
    spec = WorkerSpec(
        model=str(model),
        stages=stages,
        dtype=dtype_name(dtype) if dtype else None,
        workload=Workload(input_ids.shape[0], input_ids.shape[1] + max_new_tokens),
        timeout_s=DEFAULT_TIMEOUT_S,
        device="cuda" if torch.cuda.is_available() else "cpu",
        budgets=tuple(parse_rank_budgets(max_memory, stages).items()),
        trust_remote_code=trust_remote_code,
    )
    rank = join(spec)
    try:
        started = time.perf_counter()
        new_tokens = rank.generate(request)
        seconds = time.perf_counter() - started
    finally:
        leave()
    return None if new_tokens is None else RankOutput(new_tokens, rank.stage_plan, seconds)
