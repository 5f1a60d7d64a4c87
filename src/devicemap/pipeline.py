"""Pipeline-parallel generation: one process per device, every device busy at once.

A device map runs one device at a time; a pipeline gives each rank (a process owning one
GPU, or a CPU process) one contiguous stage of the model, planned by the same exact
planner, and streams micro-batches through the stages so that all of them compute at
once. Each rank reads only its own stage's tensors from the checkpoint folder.

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
from collections.abc import Sequence
from pathlib import Path

import psutil
import torch
from transformers import AutoTokenizer, GenerationConfig

from .errors import DeviceMapError, PipelineError
from .pipeline_launch import Workers
from .pipeline_schedule import Request, Sampling
from .pipeline_stages import RankBudgets, StagePlan, parse_rank_budgets, split_stages
from .pipeline_worker import WorkerSpec, join, leave
from .skeleton import load_config
from .workload import Workload, dtype_name

DEFAULT_TIMEOUT_S = 300.0

__all__ = ["Pipeline", "StagePlan", "generate", "generate_cli", "plan_stages"]


def plan_stages(
    model: str | os.PathLike,
    stages: int,
    *,
    dtype: torch.dtype | str | None = None,
    max_memory: RankBudgets | None = None,
    workload: Workload | None = None,
    device: str = "auto",
) -> StagePlan:
    """Plan which blocks each of ``stages`` ranks holds, from the config alone.

    ``max_memory`` gives ranks' budgets ("0=8GiB,1=16GiB", a dict or a list); ranks it
    leaves out get this machine's free memory: GPU ``rank``'s, or an equal share of RAM.

    >>> print(plan_stages("smollm2", 2, max_memory="0=1GiB,1=2GiB"))  # doctest: +SKIP
    """
    from .api import profile_of

    kind = _device_kind(device, stages)
    budgets = _rank_budgets(max_memory, stages, kind)
    return split_stages(profile_of(model, dtype), budgets, workload)


class Pipeline:
    """A model split into ``stages`` worker processes on this machine, loaded once, serving many calls.

    ``device`` is "cpu" (gloo, one process per stage), "cuda" (NCCL, rank r on GPU r) or
    "auto" (CUDA when this machine has a GPU). ``threads_per_stage`` defaults to an equal
    share of the CPU cores for CPU stages. A rank that fails, dies, or stops answering for
    ``timeout_s`` stops the whole pipeline with a :class:`PipelineError` naming it.

    >>> with Pipeline(demo_model_path(), stages=2) as pipe:  # doctest: +SKIP
    ...     pipe.generate_text(["What is machine learning?"], max_new_tokens=20)
    """

    def __init__(
        self,
        model: str | os.PathLike,
        stages: int = 2,
        *,
        dtype: torch.dtype | str | None = None,
        max_memory: RankBudgets | None = None,
        workload: Workload | None = None,
        device: str = "auto",
        threads_per_stage: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        master_addr: str = "127.0.0.1",
    ):
        self.model = Path(model)
        self.config = load_config(self.model)
        self.stage_plan = plan_stages(
            self.model, stages, dtype=dtype, max_memory=max_memory, workload=workload, device=device
        )
        kind = _device_kind(device, stages)
        spec = WorkerSpec(
            model=str(self.model),
            stages=stages,
            dtype=dtype_name(dtype) if dtype is not None else None,
            workload=self.stage_plan.workload,
            timeout_s=timeout_s,
            device=kind,
            threads=threads_per_stage or (max(1, (os.cpu_count() or 1) // stages) if kind == "cpu" else None),
            blocks=tuple(stage.blocks for stage in self.stage_plan.stages),
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

        >>> pipe.generate([[1, 2, 3], [4]], max_new_tokens=8).shape  # doctest: +SKIP
        torch.Size([2, 11])
        """
        if max_new_tokens < 1:
            raise DeviceMapError(f"max_new_tokens {max_new_tokens} must be at least 1")
        defaults = _generation_defaults(self.model, self.config)
        eos = _as_tuple(defaults[0] if eos_token_id is None else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else defaults[1] if defaults[1] is not None else (eos or (0,))[0]
        ids, mask = _left_padded(input_ids, attention_mask, pad, self.config.vocab_size)
        request = Request(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            eos_token_ids=eos,
            pad_token_id=pad,
            micro_batches=micro_batches or len(self.stage_plan.stages),
            sampling=Sampling(**sampling),
        )
        new_tokens = torch.tensor(self._workers.generate(request), dtype=torch.int64)
        return torch.cat([ids, new_tokens], dim=1)

    def generate_text(self, prompts: Sequence[str], *, max_new_tokens: int = 20, chat: bool = False, **options) -> list[str]:
        """Generate a continuation of each prompt; ``chat`` wraps them in the model's chat template.

        >>> pipe.generate_text(["What is machine learning?"], max_new_tokens=30)  # doctest: +SKIP
        """
        tokenizer = self.tokenizer
        inputs = tokenize(tokenizer, prompts, chat)
        output = self.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=max_new_tokens, **options)
        return tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    @property
    def tokenizer(self):
        """The model folder's tokenizer, loaded on first use."""
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model)
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

    >>> devicemap.pipeline.generate(demo_model_path(), ["What is machine learning?"], stages=2)  # doctest: +SKIP
    """
    pipeline_options = {key: options.pop(key) for key in _PIPELINE_OPTIONS if key in options}
    if "workload" not in pipeline_options:
        pipeline_options["workload"] = Workload(len(prompts))
    with Pipeline(model, stages, **pipeline_options) as pipe:
        return pipe.generate_text(prompts, max_new_tokens=max_new_tokens, **options)


_PIPELINE_OPTIONS = ("dtype", "max_memory", "workload", "device", "threads_per_stage", "timeout_s", "master_addr")


def tokenize(tokenizer, prompts: Sequence[str], chat: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded token ids and mask for ``prompts``, in the chat template when ``chat``."""
    if chat:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
        ]
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer(list(prompts), return_tensors="pt", padding=True, add_special_tokens=not chat)


def _device_kind(device: str, stages: int) -> str:
    if stages < 1:
        raise PipelineError(f"a pipeline needs at least 1 stage, not {stages}")
    kind = device.strip().lower()
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind not in ("cpu", "cuda"):
        raise PipelineError(f"pipeline device {device!r} is not understood; use 'auto', 'cuda' or 'cpu'")
    if kind == "cuda" and torch.cuda.device_count() < stages:
        raise PipelineError(
            f"{stages} stages on CUDA need {stages} GPUs on this machine, which has {torch.cuda.device_count()}; "
            "use fewer stages, device='cpu', or torchrun across machines"
        )
    return kind


def _rank_budgets(max_memory: RankBudgets | None, stages: int, kind: str) -> list[int]:
    given = parse_rank_budgets(max_memory, stages)
    budgets = []
    for rank in range(stages):
        if rank in given:
            budgets.append(given[rank])
        elif kind == "cuda":
            budgets.append(torch.cuda.mem_get_info(rank)[0])
        else:
            budgets.append(psutil.virtual_memory().available // stages)
    return budgets


def _generation_defaults(model: Path, config) -> tuple[int | list[int] | None, int | None]:
    """The model's EOS token id(s) and pad token id, from generation_config.json or config.json."""
    try:
        generation = GenerationConfig.from_pretrained(model)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return generation.eos_token_id, generation.pad_token_id


def _as_tuple(token_ids: int | Sequence[int] | None) -> tuple[int, ...]:
    if token_ids is None:
        return ()
    if isinstance(token_ids, int):
        return (token_ids,)
    return tuple(int(token) for token in token_ids)


def _left_padded(
    input_ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None, pad: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask with every row's real tokens at the right end, as ``generate`` wants them."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.ndim != 2:
            raise DeviceMapError(f"input_ids has shape {list(input_ids.shape)}; pass [batch, tokens]")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(torch.int64)
        if mask.shape != input_ids.shape:
            raise DeviceMapError(
                f"attention_mask has shape {list(mask.shape)} but input_ids has {list(input_ids.shape)}; they must match"
            )
        if _is_left_padded(mask):
            rows = None
        else:
            rows = [ids[row_mask.bool()].tolist() for ids, row_mask in zip(input_ids, mask)]
    else:
        rows = [list(row) for row in input_ids]
    if rows is not None:
        if not rows or any(len(row) == 0 for row in rows):
            raise DeviceMapError("every prompt needs at least one token; an empty prompt has nothing to continue")
        width = max(len(row) for row in rows)
        input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.int64)
        mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.int64)
    input_ids = input_ids.to(torch.int64)
    real = input_ids[mask.bool()]
    if real.numel() and (real.min() < 0 or real.max() >= vocab_size):
        bad = real[(real < 0) | (real >= vocab_size)][0].item()
        raise DeviceMapError(f"token id {bad} is outside the model's vocabulary of {vocab_size} tokens")
    return input_ids, mask


def _is_left_padded(mask: torch.Tensor) -> bool:
    """Every row is zeros then ones, with at least one one."""
    return bool((mask[:, -1] == 1).all() and (mask[:, 1:] >= mask[:, :-1]).all())


def generate_cli(model_path: Path, prompts: list[str], args) -> int:
    """``devicemap generate ... --pipeline N``: on one machine, or as one rank under torchrun."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _generate_as_rank(model_path, prompts, args)
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    with Pipeline(
        model_path, args.pipeline, dtype=args.dtype, max_memory=args.max_memory, workload=_cli_workload(model_path, prompts, args)
    ) as pipe:
        console.print(pipe.stage_plan.table())
        started = time.perf_counter()
        texts = pipe.generate_text(prompts, max_new_tokens=args.max_new_tokens, chat=args.chat)
        elapsed = time.perf_counter() - started
    _print_texts(console, pipe.tokenizer, texts, elapsed)
    return 0


def _cli_workload(model_path: Path, prompts: list[str], args) -> Workload:
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompt_tokens = tokenize(tokenizer, prompts, args.chat)["input_ids"].shape[1]
    return Workload(len(prompts), prompt_tokens + args.max_new_tokens)


def _generate_as_rank(model_path: Path, prompts: list[str], args) -> int:
    """One rank of a torchrun job: every rank tokenizes the same prompts; rank 0 prints."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    inputs = tokenize(tokenizer, prompts, args.chat)
    config = load_config(model_path)
    eos, pad = _generation_defaults(model_path, config)
    eos = _as_tuple(eos)
    spec = WorkerSpec(
        model=str(model_path),
        stages=args.pipeline,
        dtype=dtype_name(args.dtype) if args.dtype else None,
        workload=_cli_workload(model_path, prompts, args),
        timeout_s=DEFAULT_TIMEOUT_S,
        device="cuda" if torch.cuda.is_available() else "cpu",
        budgets=tuple(parse_rank_budgets(args.max_memory, args.pipeline).items()),
    )
    request = Request(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        max_new_tokens=args.max_new_tokens,
        eos_token_ids=eos,
        pad_token_id=pad if pad is not None else (eos or (0,))[0],
        micro_batches=args.pipeline,
    )
    rank = join(spec)
    try:
        started = time.perf_counter()
        new_tokens = rank.generate(request)
        elapsed = time.perf_counter() - started
    finally:
        leave()
    if new_tokens is not None:
        from rich.console import Console

        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        _print_texts(Console(stderr=True, highlight=False), tokenizer, texts, elapsed)
    return 0


def _print_texts(console, tokenizer, texts: list[str], elapsed: float) -> None:
    for text in texts:
        print(text)
    generated = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    console.print(f"\n{generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tokens/s")
