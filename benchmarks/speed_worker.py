"""One run of one case, in a fresh process: load the model one way, then time what the case asks.

The suite starts ``python -m benchmarks.speed_worker SPEC`` (SPEC: the case and the
settings as JSON) and reads the last stdout line, ``RESULT {...}``. Libraries are
imported before the clock starts, so import time counts for neither system; so is
the checkpoint's architecture, with the rest of what transformers does once per
process (see ``prepare_architecture``).
"""

import importlib
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .speed_cases import COLD_DECODE
from .speed_checkpoints import converted_bytes, read_every_byte, weight_files
from .speed_pages import disk_ranges, drop_pages, last_read_s, read_bytes, whole_files

RESULT_PREFIX = "RESULT "
_H2D_BYTES = 256 * 2**20
# Token ids drawn from this range avoid the special tokens at the start of Llama vocabularies.
_FIRST_ORDINARY_TOKEN = 100


def main(argv: list[str]) -> int:
    """Measure the case given as JSON in ``argv[0]`` and print its figures as one JSON line."""
    spec = json.loads(argv[0])
    if spec["settings"].get("threads"):
        torch.set_num_threads(spec["settings"]["threads"])
    print(RESULT_PREFIX + json.dumps(measure(spec["case"], spec["settings"])), flush=True)
    return 0


def measure(case: dict, settings: dict) -> dict:
    """The figures of one run of ``case`` (a ``Case`` as a dict)."""
    if case["system"] == "raw-read":
        return time_raw_read(Path(case["folder"]))
    if case["system"] == "cold-read":
        return time_cold_read(Path(case["folder"]))
    if case["system"] == "read-and-fill":
        return time_read_and_fill(Path(case["folder"]), case["dtype"])
    if case["system"] == "h2d":
        return measure_host_to_device(case["offloaded_bytes"])
    return measure_model(case, settings)


def time_raw_read(folder: Path) -> dict:
    """Seconds to read every byte of the folder's safetensors files into one reused buffer.

    >>> time_raw_read(Path("SmolLM2-135M-Instruct"))  # doctest: +SKIP
    {'read_s': 0.21, 'read_bytes': 538090408}
    """
    start = time.perf_counter()
    read_bytes = read_every_byte(folder)
    return {"read_s": time.perf_counter() - start, "read_bytes": read_bytes}


def time_cold_read(folder: Path) -> dict:
    """Bytes per second read from the folder's safetensors files, one after another, with none of their
    pages in memory: the disk's sequential read speed, the floor of a cold disk block's read.

    >>> time_cold_read(Path("tinyllama-1.1b-random-bfloat16"))  # doctest: +SKIP
    {'read_s': 1.05, 'read_bytes': 2200152064, 'disk_read_bytes': 2200152064, 'cold_read_bytes_per_s': 2.1e9}
    """
    drop_pages(whole_files(weight_files(folder)))
    before = read_bytes()
    figures = time_raw_read(folder)
    figures["disk_read_bytes"] = read_bytes() - before
    figures["cold_read_bytes_per_s"] = figures["read_bytes"] / figures["read_s"]
    return figures


def time_read_and_fill(folder: Path, dtype: str) -> dict:
    """Seconds to read every byte of the folder's files, then to fill fresh memory as large as the
    checkpoint once converted to ``dtype``: what a converting load cannot avoid doing.

    Fresh memory costs its first touch (a page fault per page), which some machines make
    dearer than reading the same bytes from the page cache.

    >>> time_read_and_fill(Path("SmolLM2-135M-Instruct"), "bfloat16")  # doctest: +SKIP
    {'read_s': 0.076, 'fill_s': 0.089, 'floor_s': 0.165, 'fill_bytes': 269045184}
    """
    read = time_raw_read(folder)
    fill_bytes = converted_bytes(folder, dtype)
    start = time.perf_counter()
    torch.empty(fill_bytes, dtype=torch.uint8).fill_(1)
    fill_s = time.perf_counter() - start
    return {"read_s": read["read_s"], "fill_s": fill_s, "floor_s": read["read_s"] + fill_s, "fill_bytes": fill_bytes}


def measure_host_to_device(offloaded_bytes: int) -> dict:
    """Pinned host to GPU 0 bandwidth, and the decode rate it allows when each token copies ``offloaded_bytes``."""
    host = torch.empty(_H2D_BYTES, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(_H2D_BYTES, dtype=torch.uint8, device="cuda:0")
    device.copy_(host, non_blocking=True)
    best_s = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        device.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best_s = min(best_s, start.elapsed_time(end) / 1000)
    bandwidth = _H2D_BYTES / best_s
    return {"h2d_bytes_per_s": bandwidth, "bound_tokens_per_s": bandwidth / max(offloaded_bytes, 1)}


def measure_model(case: dict, settings: dict) -> dict:
    """Load the case's model (timed, with the peak RSS it reached), then time decode and prefill."""
    for module in IMPORTS[case["system"]]:
        importlib.import_module(module)
    prepare_architecture(Path(case["folder"]))
    loader = LOADERS[case["system"]]
    figures = {"import_peak_rss_bytes": peak_rss_bytes()}
    with tempfile.TemporaryDirectory(prefix="devicemap-bench-") as offload_folder:
        start = time.perf_counter()
        model = loader(case, Path(offload_folder))
        synchronize(case)
        figures["load_s"] = time.perf_counter() - start
        figures["load_peak_rss_bytes"] = peak_rss_bytes()
        if "decode" in case["measures"]:
            figures.update(time_decode(model, case, settings))
        if "prefill" in case["measures"]:
            figures.update(time_prefill(model, case, settings))
        if COLD_DECODE in case["measures"]:
            figures.update(time_cold_decode(model, case, settings, Path(offload_folder)))
        figures["peak_rss_bytes"] = peak_rss_bytes()
    return figures


def prepare_architecture(folder: Path) -> None:
    """Do before the clock what transformers does once per process, whichever system loads:
    import the checkpoint's modeling module (transformers imports each on first use), and
    build its table of checkpoint renaming rules (built on first use, for every architecture).

    A second load in the same process does neither; together they took 0.08 s of a
    0.2 s load of the demo model.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(folder)
    # Both systems build the causal LM of the config's type; looking its class up imports its module.
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # transformers 4 renames nothing
        return
    get_checkpoint_conversion_mapping(config.model_type)


def load_with_transformers(case: dict, offload_folder: Path):
    """transformers' ``from_pretrained`` with the case's device map (accelerate's hooks)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        case["folder"], device_map=case["device_map"], dtype=_dtype(case), offload_folder=str(offload_folder)
    )


def load_with_devicemap(case: dict, offload_folder: Path):
    """``devicemap.load`` with the case's device map."""
    from devicemap.runtime.load import load

    return load(case["folder"], device_map=case["device_map"], dtype=_dtype(case), offload_folder=offload_folder,
                progress=False)


def load_plain(case: dict, offload_folder: Path):
    """The model in CPU memory with no hooks at all: the baseline for dispatch overhead."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(case["folder"], dtype=_dtype(case))


def load_with_hooks(case: dict, offload_folder: Path):
    """The plain model, then ``devicemap.dispatch`` over the case's map (one hook per block)."""
    from devicemap.runtime.dispatch import dispatch

    model = load_plain(case, offload_folder)
    return dispatch(model, case["device_map"])


# Imported before the clock starts: a library's import time is not part of a load.
# transformers' from_pretrained imports accelerate lazily when given a device map.
IMPORTS = {
    "transformers": ("transformers", "accelerate"),
    "devicemap": ("transformers", "devicemap.runtime.load"),
    "plain": ("transformers",),
    "hooks": ("transformers", "devicemap.runtime.dispatch"),
}
LOADERS = {
    "transformers": load_with_transformers,
    "devicemap": load_with_devicemap,
    "plain": load_plain,
    "hooks": load_with_hooks,
}


def time_decode(model, case: dict, settings: dict) -> dict:
    """Greedy ``generate`` of ``new_tokens`` tokens after a short prompt, warmed up first: its
    wall time and the time between each two consecutive tokens.

    On a shared machine the median step is the steadier figure: a neighbour's burst
    slows a few steps, not the median.
    """
    prompt = prompt_ids(model, settings["decode_prompt_tokens"], case)
    generate(model, prompt, 2)
    new_tokens = settings["new_tokens"]
    clock = TokenClock()
    start = time.perf_counter()
    output = generate(model, prompt, new_tokens, clock)
    synchronize(case)
    decode_s = time.perf_counter() - start
    steps_s = clock.steps_s()
    return {
        "decode_s": decode_s,
        "new_tokens": new_tokens,
        "decode_median_step_s": statistics.median(steps_s) if steps_s else decode_s / new_tokens,
        "decode_steps_s": steps_s,
        "tokens": output[0, -new_tokens:].tolist(),
    }


def time_prefill(model, case: dict, settings: dict) -> dict:
    """Seconds to the first token of a ``prefill_tokens``-token prompt: the quickest of a few tries."""
    prompt = prompt_ids(model, settings["prefill_tokens"], case)
    tries_s = []
    for _ in range(settings["prefill_tries"]):
        start = time.perf_counter()
        generate(model, prompt, 1)
        synchronize(case)
        tries_s.append(time.perf_counter() - start)
    return {"prefill_s": min(tries_s), "prefill_tries_s": tries_s}


def time_cold_decode(model, case: dict, settings: dict, offload_folder: Path) -> dict:
    """Greedy decoding with the pages of the case's disk blocks dropped before every step, as for a
    model bigger than memory: each step's time (the dropping left out) and the bytes it read from disk.

    The disk blocks are the checkpoint's tensors the map puts on disk, and whatever either
    system wrote into its offload folder. The prompt's step is not a decode step.
    """
    disk = disk_ranges(Path(case["folder"]), case["device_map"])
    prompt = prompt_ids(model, settings["decode_prompt_tokens"], case)
    generate(model, prompt, 2)
    clock = ColdClock(lambda: drop_pages(disk + whole_files(_files_under(offload_folder))))
    new_tokens = settings["cold_tokens"]
    output = generate(model, prompt, new_tokens, clock)
    steps_s, reads_bytes = clock.steps_s[1:], clock.reads_bytes[1:]
    return {
        "cold_step_s": statistics.median(steps_s),
        "cold_steps_s": steps_s,
        "cold_read_bytes_per_token": statistics.mean(reads_bytes),
        "cold_reads_bytes": reads_bytes,
        "tokens": output[0, -new_tokens:].tolist(),
    }


def _files_under(folder: Path) -> list[Path]:
    return [path for path in sorted(folder.rglob("*")) if path.is_file()]


class ColdClock:
    """A ``generate`` streamer that makes the disk blocks cold after each token, then starts the next step's clock.

    A step ends when its token arrives and the reads it started (a read ahead for the next
    step) have all started; the dropping is not timed, and nothing is read during it. It
    is given the prompt first, so its first step is the prompt's.
    """

    def __init__(self, make_cold: Callable[[], None]):
        self.make_cold = make_cold
        self.steps_s: list[float] = []
        self.reads_bytes: list[int] = []
        self._started_s: float | None = None
        self._read_before = 0

    def put(self, value) -> None:
        arrived_s = max(time.perf_counter(), last_read_s())
        read = read_bytes()
        if self._started_s is not None:
            self.steps_s.append(arrived_s - self._started_s)
            self.reads_bytes.append(read - self._read_before)
        self.make_cold()
        self._read_before = read_bytes()
        self._started_s = time.perf_counter()

    def end(self) -> None:
        pass


class TokenClock:
    """A ``generate`` streamer that notes when each token arrives; it is given the prompt first."""

    def __init__(self):
        self.arrivals_s: list[float] = []

    def put(self, value) -> None:
        self.arrivals_s.append(time.perf_counter())

    def end(self) -> None:
        pass

    def steps_s(self) -> list[float]:
        """Seconds between consecutive new tokens; the first token's prefill is not a step."""
        tokens_s = self.arrivals_s[1:]
        return [later - earlier for earlier, later in zip(tokens_s, tokens_s[1:])]


def generate(model, prompt: torch.Tensor, new_tokens: int, streamer: TokenClock | ColdClock | None = None) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (end-of-sequence does not stop it)."""
    return model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        streamer=streamer,
    )


def prompt_ids(model, length: int, case: dict) -> torch.Tensor:
    """The same ``length`` token ids for every system: a fixed draw from the ordinary vocabulary."""
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(_FIRST_ORDINARY_TOKEN, model.config.vocab_size, (1, length), generator=generator)
    return ids.to("cuda:0" if case["gpu"] else "cpu")


def synchronize(case: dict) -> None:
    """Wait for queued GPU work, so that the clock measures it."""
    if case["gpu"]:
        torch.cuda.synchronize()


def peak_rss_bytes() -> int:
    """The highest resident memory this process has reached so far.

    Linux's ``VmHWM`` starts afresh at exec; ``ru_maxrss`` would instead carry over the
    suite's own peak from before the fork.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # macOS reports bytes, other systems kilobytes.
    return peak if sys.platform == "darwin" else peak * 1024


def _dtype(case: dict) -> torch.dtype:
    return getattr(torch, case["dtype"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
