"""What the speed suite measures: its cases, and the comparisons (rows) made from them.

Pure data: a ``Case`` is one way of loading and running one checkpoint, run in a
fresh process; a ``Comparison`` names the cases whose figures one table row sets
side by side, and the targets of issue 4 that row must meet. Both systems of a row
always get the same device map.
"""

from dataclasses import dataclass, replace

from .speed_checkpoints import BenchModel, short_dtype

MEMORY = "memory"
HALF_DISK = "half-disk"
ALL_DISK = "all-disk"
CPU_BUDGET = "cpu-1GB"
PER_BLOCK = "per-block"
GPU = "gpu"
GPU_HALF_CPU = "gpu-half-cpu"
# A model bigger than memory: the disk blocks' pages are dropped before every decode step.
COLD_ALL = "cold-all"
COLD_HALF = "cold-half"
COLD_COMPUTE = "cold-compute"
COLD_DECODE = "cold-decode"
CPU_BUDGET_BYTES = 10**9
DECODE_SECTION = "decode, tokens/s"
PREFILL_SECTION = "prefill (time to first token), s"
LOAD_SECTION = "load, s"
RSS_SECTION = "load peak RSS, MB"
# Issue 4: offloaded decoding keeps this share of the same model's in-memory speed.
_DECODE_TARGETS = {HALF_DISK: 0.95, ALL_DISK: 0.90, CPU_BUDGET: 0.95}
PLACEMENT_LABELS = {
    MEMORY: "in memory",
    HALF_DISK: "2nd half of layers on disk",
    ALL_DISK: "all layers on disk",
    CPU_BUDGET: "1 GB CPU, rest on disk",
    PER_BLOCK: "a hook per block",
    GPU: "all on GPU 0",
    GPU_HALF_CPU: "2nd half of layers CPU→GPU",
    COLD_ALL: "all layers on disk, cold",
    COLD_HALF: "2nd half of layers on disk, cold",
    COLD_COMPUTE: "in memory: compute per token",
}


@dataclass(frozen=True)
class Settings:
    """How much each case does, and how often."""

    runs: int = 3
    new_tokens: int = 64
    decode_prompt_tokens: int = 8
    prefill_tokens: int = 512
    prefill_tries: int = 3
    cold_tokens: int = 8
    threads: int | None = None
    timeout_s: float = 1200.0


QUICK = Settings(runs=1, new_tokens=8, decode_prompt_tokens=8, prefill_tokens=64, prefill_tries=1)


@dataclass(frozen=True)
class Case:
    """One system loading one checkpoint one way; measured in a fresh process each run.

    ``system`` is "devicemap", "transformers" (``from_pretrained(device_map=...)``),
    "plain" (the model with no hooks), "hooks" (the plain model through
    ``devicemap.dispatch``), "raw-read" (every byte of the files), "read-and-fill" (that,
    then fresh memory the size of the checkpoint at ``dtype``) or "h2d" (host to GPU
    bandwidth). "cold-read" reads every byte of the files with none of them in memory.
    ``measures`` lists what to time after loading: "decode", "prefill", "cold-decode"
    (decoding with the disk blocks' pages dropped before every step).
    """

    system: str
    model: str
    folder: str
    placement: str
    dtype: str
    device_map: str | dict | None = None
    measures: tuple[str, ...] = ()
    gpu: bool = False
    offloaded_bytes: int = 0

    @property
    def key(self) -> str:
        return f"{self.system}/{self.model}/{self.placement}"


@dataclass(frozen=True)
class Target:
    """A bound on one ratio of a row: devicemap ÷ transformers, or devicemap ÷ the reference."""

    against: str
    bound: float
    at_most: bool

    def met(self, ratio: float) -> bool:
        return ratio <= self.bound if self.at_most else ratio >= self.bound

    def describe(self) -> str:
        sign = "≤" if self.at_most else "≥"
        short = "tf" if self.against == "transformers" else "ref"
        return f"{sign} {self.bound:.2f} × {short}"


@dataclass(frozen=True)
class Comparison:
    """One table row: devicemap's figure beside transformers' and a physical reference."""

    section: str
    label: str
    metric: str
    devicemap: str
    transformers: str | None = None
    reference: str | None = None
    reference_metric: str | None = None
    reference_label: str = ""
    targets: tuple[Target, ...] = ()
    # transformers' ratio is taken to its own counterpart of the reference where one exists
    # (its own in-memory speed), as issue 4 quotes it; otherwise to the same reference.
    transformers_reference: str | None = None


@dataclass(frozen=True)
class SuiteModels:
    """The checkpoints one run of the suite uses; ``tinyllama`` is left out by --quick."""

    demo_fp32: BenchModel
    demo_bf16: BenchModel
    tinyllama: BenchModel | None
    budget_map: dict | None = None


def layer_map(layer_count: int, first_offloaded: int, offload_device: str, home: str | int = "cpu") -> dict:
    """A Llama device map: layers from ``first_offloaded`` on ``offload_device``, the rest on ``home``.

    >>> layer_map(2, 1, "disk")
    {'model.embed_tokens': 'cpu', 'model.rotary_emb': 'cpu', 'model.layers.0': 'cpu', 'model.layers.1': 'disk', 'model.norm': 'cpu', 'lm_head': 'cpu'}
    """
    # The rotary embedding holds buffers only; devicemap wants every module's tensors placed.
    layers = {f"model.layers.{i}": offload_device if i >= first_offloaded else home for i in range(layer_count)}
    return {"model.embed_tokens": home, "model.rotary_emb": home, **layers, "model.norm": home, "lm_head": home}


def offload_maps(layer_count: int) -> dict[str, str | dict]:
    """The CPU placements every demo checkpoint runs under, by name."""
    return {
        MEMORY: "cpu",
        HALF_DISK: layer_map(layer_count, layer_count // 2, "disk"),
        ALL_DISK: layer_map(layer_count, 0, "disk"),
    }


def model_cases(model: BenchModel, placement: str, device_map, measures, dtype: str | None = None, gpu: bool = False) -> list[Case]:
    """The devicemap and transformers cases of one checkpoint under one shared device map."""
    load_dtype = dtype or model.dtype
    name = model.name if load_dtype == model.dtype else f"{model.name}-as-{short_dtype(load_dtype)}"
    return [
        Case(system, name, str(model.folder), placement, load_dtype, device_map, tuple(measures), gpu)
        for system in ("devicemap", "transformers")
    ]


def raw_read_case(model: BenchModel) -> Case:
    """Reading every byte of a checkpoint's files: the floor for a load that reads them all."""
    return Case("raw-read", model.name, str(model.folder), "files", model.dtype)


def read_and_fill_case(model: BenchModel, dtype: str) -> Case:
    """Reading every byte, then filling fresh memory for the converted result: the floor of a converting load."""
    return Case("read-and-fill", f"{model.name}-as-{short_dtype(dtype)}", str(model.folder), "files", dtype)


def cpu_cases(models: SuiteModels, layer_counts: dict[str, int]) -> list[Case]:
    """Every CPU case: offload placements, the 1 GB budget, dtype conversion, dispatch, raw reads."""
    cases: list[Case] = []
    for model in (models.demo_fp32, models.demo_bf16):
        cases.append(raw_read_case(model))
        for placement, device_map in offload_maps(layer_counts[model.name]).items():
            cases += model_cases(model, placement, device_map, ("decode", "prefill"))
    conversion_maps = offload_maps(layer_counts[models.demo_fp32.name])
    for placement in (MEMORY, ALL_DISK):
        cases += model_cases(models.demo_fp32, placement, conversion_maps[placement], (), dtype="bfloat16")
    cases.append(read_and_fill_case(models.demo_fp32, "bfloat16"))
    if models.tinyllama is not None:
        cases.append(raw_read_case(models.tinyllama))
        cases += model_cases(models.tinyllama, MEMORY, "cpu", ("decode", "prefill"))
        if models.budget_map is not None:
            cases += model_cases(models.tinyllama, CPU_BUDGET, models.budget_map, ("decode", "prefill"))
    per_block = layer_map(layer_counts[models.demo_fp32.name], 0, "cpu")
    for system in ("plain", "hooks"):
        demo = models.demo_fp32
        cases.append(Case(system, demo.name, str(demo.folder), PER_BLOCK, demo.dtype, per_block, ("decode", "prefill")))
    return cases


def gpu_cases(model: BenchModel, layer_count: int, offloaded_bytes: int) -> list[Case]:
    """Half of a bf16 model's layers kept in CPU memory and streamed to GPU 0, against all on it."""
    cases = model_cases(model, GPU, "cuda:0", ("decode", "prefill"), gpu=True)
    half_map = layer_map(layer_count, layer_count // 2, "cpu", home=0)
    cases += model_cases(model, GPU_HALF_CPU, half_map, ("decode", "prefill"), gpu=True)
    cases.append(Case("h2d", model.name, str(model.folder), GPU_HALF_CPU, model.dtype, gpu=True, offloaded_bytes=offloaded_bytes))
    return cases


def cold_cases(model: BenchModel, layer_count: int) -> list[Case]:
    """Disk offload as it is used, for a model bigger than memory: its disk blocks made cold before every step.

    Both systems decode with all layers, then the second half, on disk; beside them, the
    checkpoint's cold sequential read speed and the plain model's compute per token in
    memory, which make each row's ideal (``speed_cold``).
    """
    cases = [
        Case("cold-read", model.name, str(model.folder), "files", model.dtype),
        Case("plain", model.name, str(model.folder), COLD_COMPUTE, model.dtype, None, ("decode",)),
    ]
    for placement, first_offloaded in ((COLD_ALL, 0), (COLD_HALF, layer_count // 2)):
        cases += model_cases(model, placement, layer_map(layer_count, first_offloaded, "disk"), (COLD_DECODE,))
    return cases


def comparisons(cases: list[Case]) -> list[Comparison]:
    """The table's rows for ``cases``, in the order of issue 4's targets.

    Rows are made from the devicemap cases of the full suite, then kept where the run
    has either system's case, so that ``--only transformers`` still shows its column.
    Cold cases have a table of their own (``speed_cold``).
    """
    keys = {case.key for case in cases}
    warm = [case for case in cases if COLD_DECODE not in case.measures]
    everything = [replace(case, system="devicemap") if case.system == "transformers" else case for case in warm]
    rows = decode_rows(everything) + prefill_rows(everything) + load_rows(everything)
    return [row for row in dict.fromkeys(rows) if row.devicemap in keys or row.transformers in keys]


def decode_rows(cases: list[Case]) -> list[Comparison]:
    return [decode_row(case) for case in _devicemap_cases(cases, "decode")] + [dispatch_row()]


def decode_row(case: Case) -> Comparison:
    """Decode speed beside transformers'; offloaded, also against the same model all in memory."""
    transformers = _with(case, system="transformers")
    if case.placement in (MEMORY, GPU):
        return Comparison(DECODE_SECTION, _label(case), "decode_tokens_per_s", case.key, transformers)
    if case.placement == GPU_HALF_CPU:
        return Comparison(DECODE_SECTION, _label(case), "decode_tokens_per_s", case.key, transformers,
                          _with(case, system="h2d"), "bound_tokens_per_s", "H2D bound")
    target = Target("reference", _DECODE_TARGETS[case.placement], at_most=False)
    return Comparison(DECODE_SECTION, _label(case), "decode_tokens_per_s", case.key, transformers,
                      _memory(case).key, None, "in memory", (target,), _with(_memory(case), "transformers"))


def dispatch_row() -> Comparison:
    """Hooks at every block boundary of a model on one device, against the same model with none."""
    return Comparison(DECODE_SECTION, f"demo fp32, {PLACEMENT_LABELS[PER_BLOCK]}", "decode_tokens_per_s",
                      f"hooks/demo-fp32/{PER_BLOCK}", None, f"plain/demo-fp32/{PER_BLOCK}", None, "no hooks",
                      (Target("reference", 0.98, at_most=False),))


def prefill_rows(cases: list[Case]) -> list[Comparison]:
    rows = []
    for case in _devicemap_cases(cases, "prefill"):
        transformers = _with(case, system="transformers")
        if case.placement in (MEMORY, GPU):
            rows.append(Comparison(PREFILL_SECTION, _label(case), "prefill_s", case.key, transformers))
            continue
        memory = _memory(case)
        rows.append(Comparison(PREFILL_SECTION, _label(case), "prefill_s", case.key, transformers,
                               memory.key, None, "in memory", (Target("transformers", 1.0, at_most=True),),
                               _with(memory, "transformers")))
    return rows


def load_rows(cases: list[Case]) -> list[Comparison]:
    time_rows, memory_rows = [], []
    for case in _devicemap_cases(cases, None):
        # A dtype-converting load must read every byte, so the raw read bounds it.
        converts = "-as-" in case.model
        read = f"raw-read/{case.model.split('-as-')[0]}/files"
        time_targets = (Target("transformers", 1.0, at_most=True),)
        if converts:
            time_targets += (Target("reference", 1.5, at_most=True),)
        transformers = _with(case, system="transformers")
        time_rows.append(Comparison(LOAD_SECTION, _label(case), "load_s", case.key, transformers,
                                    read, "read_s", "raw read", time_targets))
        if converts:
            # No target: this row shows how much of the time the result's fresh memory explains.
            time_rows.append(Comparison(LOAD_SECTION, f"{_label(case)}, vs read + fill", "load_s", case.key,
                                        transformers, f"read-and-fill/{case.model}/files", "floor_s", "read + fill"))
        memory_rows.append(Comparison(RSS_SECTION, _label(case), "load_peak_rss_bytes", case.key, transformers,
                                      targets=(Target("transformers", 1.0, at_most=True),)))
    return time_rows + memory_rows


def _devicemap_cases(cases: list[Case], measure: str | None) -> list[Case]:
    return [case for case in cases if case.system == "devicemap" and (measure is None or measure in case.measures)]


def _memory(case: Case) -> Case:
    """The same system and checkpoint with nothing offloaded: on the GPU for GPU cases."""
    return replace(case, placement=GPU if case.gpu else MEMORY)


def _with(case: Case, system: str) -> str:
    return f"{system}/{case.model}/{case.placement}"


def _label(case: Case) -> str:
    model = case.model.replace("-as-", " as ").replace("-", " ")
    return f"{model}, {PLACEMENT_LABELS[case.placement]}"
