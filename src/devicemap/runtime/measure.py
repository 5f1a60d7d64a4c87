"""What a run really uses on each device, beside what its plan reserved there.

A plan reserves, per device, room beyond the weights: buffers, KV cache, activations and
streaming slots. ``measure_run`` runs the plan's workload (a prefill of random tokens,
then a few decode steps up to ``max_tokens``) and measures the same quantity:

- CUDA: the peak of ``torch.cuda.max_memory_allocated`` over the run, less the weights
  kept on the device (known exactly from the model's tensors). What was allocated before
  the run beside the weights (buffers, streaming slots) is inside that peak, as it is
  inside the reserve.
- CPU: the peak of the process's anonymous memory, sampled on a thread, less what it was
  just before the run; plus what the model already holds there beside the weights (its
  buffers, pinned staging for GPUs). Weights and the Python runtime are in "before", so
  they cancel. Pages of memory-mapped weight files (blocks computed in place, disk blocks)
  are file-backed: the kernel may drop them and read them again, so they are reported
  apart, never as used memory.

glibc serves allocations under 32 MiB from heaps it keeps, and reuses what was freed
there, so a run's anonymous memory depends on what ran before it rather than on what it
holds at once. Measuring, every allocation of ``OWN_MAPPING_BYTES`` or more gets a
mapping of its own for the rest of the process (as glibc does above 32 MiB) and goes
back to the system when freed, and what glibc kept is given back first.

The workload runs twice and the second run is measured: the first leaves behind, for the
life of the process, what the runtime sets up once (thread pools and their allocator
arenas, buffers kept for the shapes it met: a few MiB), which is not the workload's.
Measure in a fresh process, as ``devicemap check`` does: in a long-lived one (a test
session) what earlier work left in its heaps and threads can add a few MiB to the run.
"""

import ctypes
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from rich.table import Table
from torch import nn

from ..planning.plan import DeviceLedger, Plan
from ..units import format_size
from ..workload import Workload
from .dispatch import staging_bytes

NEW_TOKENS = 4
OWN_MAPPING_BYTES = 2**16
SAMPLE_SECONDS = 0.0002
# A reserve that a run uses less than this share of wastes room that could hold more tokens.
WASTE_BELOW = 0.7
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_MAPPED_WEIGHTS_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class DeviceUse:
    """One device's planned and measured bytes: beyond the weights, and in all."""

    device: str
    weight_bytes: int
    planned_reserve_bytes: int
    used_reserve_bytes: int
    planned_total_bytes: int

    @property
    def used_total_bytes(self) -> int:
        return self.weight_bytes + self.used_reserve_bytes

    @property
    def ratio(self) -> float:
        """Measured ÷ planned, beyond the weights (0 when nothing was reserved)."""
        return self.used_reserve_bytes / self.planned_reserve_bytes if self.planned_reserve_bytes else 0.0


@dataclass(frozen=True)
class Measurement:
    """A run, described by ``run``, measured per device against the plan made for ``workload``."""

    model_name: str
    workload: Workload
    run: str
    devices: tuple[DeviceUse, ...]
    file_backed_bytes: int | None

    def over_plan(self) -> tuple[DeviceUse, ...]:
        """Devices whose run used more than the plan reserved there."""
        return tuple(use for use in self.devices if use.used_reserve_bytes > use.planned_reserve_bytes)

    def table(self) -> Table:
        """Per device: the reserve planned and measured, their ratio, and the totals with weights."""
        table = Table(title=f"{self.model_name} · planned against measured")
        for column in ("device", "weights", "planned reserve", "measured peak", "ratio", "planned total",
                       "measured total"):  # fmt: skip
            table.add_column(column, justify="left" if column == "device" else "right")
        for use in self.devices:
            table.add_row(
                use.device, format_size(use.weight_bytes), format_size(use.planned_reserve_bytes),
                format_size(use.used_reserve_bytes), f"{use.ratio:.2f}", format_size(use.planned_total_bytes),
                format_size(use.used_total_bytes),
            )  # fmt: skip
        return table

    def summary(self) -> list[str]:
        """Lines under the table: the run and the file-backed pages."""
        workload = self.workload
        lines = [f"run: {self.run}, planned for batch {workload.batch_size} × {workload.max_tokens} tokens"]
        if self.file_backed_bytes is not None:
            lines.append(
                f"file-backed: {format_size(self.file_backed_bytes)} of mapped weight files resident; the measured "
                "peak leaves these pages out: the kernel drops them when memory runs short and reads them again"
            )
        return lines

    def verdicts(self) -> list[str]:
        """A line for each device that used more than its reserve, and one naming those that used under 0.7 of it."""
        lines = []
        for use in self.over_plan():
            lines.append(
                f"{use.device} used {format_size(use.used_reserve_bytes - use.planned_reserve_bytes)} more than the "
                "plan reserved: at this workload it may run out of memory; plan with a smaller workload or budget"
            )
        wasteful = [use.device for use in self.devices if 0 < use.ratio < WASTE_BELOW]
        if wasteful:
            lines.append(f"{', '.join(wasteful)} used under {WASTE_BELOW:.0%} of the reserve: it holds room unused")
        return lines


@dataclass
class Peaks:
    """What ``track_peaks`` found: per computing device, the bytes used beyond the weights, and the weights.

    Not frozen: ``track_peaks`` fills ``used_reserve_bytes`` in as its block ends.
    """

    used_reserve_bytes: dict[str, int]
    weight_bytes: dict[str, int]


def measure_run(model: nn.Module, new_tokens: int = NEW_TOKENS) -> Measurement:
    """Run the workload ``model.devicemap_plan`` was made for twice, and measure the second run against the plan.

    The prompt is ``max_tokens - new_tokens`` random token ids for each of the batch's
    sequences; ``new_tokens`` are decoded greedily after it.

    >>> import devicemap
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
    ...                      num_attention_heads=2)
    >>> plan = devicemap.plan(config, "cpu", max_memory={"cpu": "1GiB"}, workload=devicemap.Workload(1, 16))
    >>> model = devicemap.dispatch(LlamaForCausalLM(config), plan)
    >>> model.devicemap_plan = plan
    >>> [use.device for use in measure_run(model).devices]
    ['cpu']
    """
    plan: Plan = model.devicemap_plan
    workload = plan.workload
    new_tokens = min(new_tokens, workload.max_tokens - 1)
    prompt = _random_prompt(model, workload.batch_size, workload.max_tokens - new_tokens)
    _map_large_allocations()
    _generate(model, prompt, new_tokens)
    with track_peaks(model) as peaks:
        _generate(model, prompt, new_tokens)
    run = f"batch {workload.batch_size} × {prompt.shape[1]} random prompt tokens + {new_tokens} decoded"
    return measurement(plan, peaks, run)


def measurement(plan: Plan, peaks: Peaks, run: str) -> Measurement:
    """The plan's ledger beside the peaks ``track_peaks`` found over ``run``.

    >>> import devicemap
    >>> plan = devicemap.plan(nn.Linear(4, 4), "cpu", max_memory={"cpu": "1GiB"})
    >>> measurement(plan, Peaks({"cpu": 0}, {"cpu": 80}), "nothing").devices[0].used_total_bytes
    80
    """
    return Measurement(
        model_name=plan.profile.name,
        workload=plan.workload,
        run=run,
        devices=tuple(_device_use(row, peaks) for row in plan.ledger if row.device in peaks.used_reserve_bytes),
        file_backed_bytes=mapped_weight_bytes(),
    )


@contextmanager
def track_peaks(model: nn.Module) -> Iterator[Peaks]:
    """Measure, per device ``model.devicemap_plan`` computes on, the peak use beyond the weights inside the block.

    ``model`` must be loaded or dispatched with its plan in ``model.devicemap_plan``.

    >>> import devicemap
    >>> model = devicemap.dispatch(nn.Linear(256, 256), "cpu")
    >>> model.devicemap_plan = devicemap.plan(model, "cpu", max_memory={"cpu": "1GiB"})
    >>> with track_peaks(model) as peaks:
    ...     _ = model(torch.ones(4096, 256))
    >>> peaks.used_reserve_bytes["cpu"] >= 4096 * 256 * 4
    True
    """
    plan: Plan = model.devicemap_plan
    # The CPU holds reserves when it computes, and when it stages disk blocks for GPUs.
    staging = {row.device for row in plan.ledger if row.device == "cpu" and row.stream_bytes}
    computing = {placement.execution_device for placement in plan.placements} | staging
    weights = weight_bytes_by_device(model, plan)
    held = held_buffer_bytes(model)
    cuda = sorted(device for device in computing if device.startswith("cuda:"))
    peaks = Peaks({}, {device: weights.get(device, 0) for device in computing})
    for device in cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    sampler = _AnonymousPeak() if "cpu" in computing else None
    try:
        yield peaks
    finally:
        if sampler is not None:
            peaks.used_reserve_bytes["cpu"] = sampler.stop() + held.get("cpu", 0) + staging_bytes(model)
        for device in cuda:
            torch.cuda.synchronize(device)
            peaks.used_reserve_bytes[device] = torch.cuda.max_memory_allocated(device) - weights.get(device, 0)


def _device_use(row: DeviceLedger, peaks: Peaks) -> DeviceUse:
    return DeviceUse(
        device=row.device,
        weight_bytes=peaks.weight_bytes[row.device],
        planned_reserve_bytes=row.used_bytes - row.weight_bytes,
        used_reserve_bytes=peaks.used_reserve_bytes[row.device],
        planned_total_bytes=row.used_bytes,
    )


def _random_prompt(model: nn.Module, batch_size: int, tokens: int) -> torch.Tensor:
    vocab_size = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch_size, tokens), generator=generator)


def _generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> None:
    """Greedy decoding of exactly ``new_tokens``: an end-of-sequence token must not end the run early."""
    with torch.no_grad():
        model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )  # fmt: skip


def weight_bytes_by_device(model: nn.Module, plan: Plan) -> dict[str, int]:
    """Bytes of the parameters each device keeps, as the plan places their blocks; a shared tensor once.

    >>> import devicemap
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> weight_bytes_by_device(model, devicemap.plan(model, {"0": "cpu", "1": "disk"}))
    {'cpu': 80, 'disk': 80}
    """
    found: dict[str, int] = {}
    seen: set[tuple] = set()
    for placement in plan.placements:
        for parameter in model.get_submodule(placement.block).parameters():
            key = (parameter.device, parameter.data_ptr(), parameter.dtype, tuple(parameter.shape))
            if parameter.is_meta or key in seen:
                continue
            seen.add(key)
            found[placement.device] = found.get(placement.device, 0) + parameter.nbytes
    return found


def held_buffer_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's buffers on each device, each tensor once.

    >>> held_buffer_bytes(nn.BatchNorm1d(4))
    {'cpu': 40}
    """
    found: dict[str, int] = {}
    seen: set[tuple] = set()
    for buffer in model.buffers():
        key = (buffer.device, buffer.data_ptr(), buffer.dtype, tuple(buffer.shape))
        if key not in seen:
            seen.add(key)
            found[str(buffer.device)] = found.get(str(buffer.device), 0) + buffer.nbytes
    return found


def mapped_weight_bytes() -> int | None:
    """Resident bytes of this process's mappings of safetensors files (``None`` where /proc cannot tell).

    >>> mapped_weight_bytes() is None or mapped_weight_bytes() >= 0
    True
    """
    smaps = Path("/proc/self/smaps")
    if not smaps.is_file():
        return None
    total = 0
    counting = False
    with smaps.open() as lines:
        for line in lines:
            fields = line.split()
            if fields and "-" in fields[0] and not fields[0].endswith(":"):
                counting = fields[-1].endswith(_MAPPED_WEIGHTS_SUFFIX)
            elif counting and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


class _AnonymousPeak:
    """Samples the process's anonymous memory on a thread until stopped; the peak above where it started."""

    def __init__(self):
        gc.collect()
        _map_large_allocations()
        self._process = psutil.Process()
        self._start = self._peak = self._anonymous_bytes()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="devicemap-measure", daemon=True)
        self._thread.start()

    def _anonymous_bytes(self) -> int:
        memory = self._process.memory_info()
        return memory.rss - getattr(memory, "shared", 0)

    def _sample(self) -> None:
        while not self._stopping.wait(SAMPLE_SECONDS):
            self._peak = max(self._peak, self._anonymous_bytes())

    def stop(self) -> int:
        self._stopping.set()
        self._thread.join()
        return max(self._peak, self._anonymous_bytes()) - self._start


def _map_large_allocations() -> None:
    """On glibc, map each allocation of ``OWN_MAPPING_BYTES`` or more on its own, and give back what is kept."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        return  # not glibc: its allocator keeps no such heaps to account for
    libc.mallopt(_M_MMAP_THRESHOLD, OWN_MAPPING_BYTES)
    libc.malloc_trim(0)
