"""The devicemap command line: a thin shell over the public API.

    devicemap plan MODEL --max-memory 0=24GiB,1=24GiB,cpu=64GiB --strategy auto --batch-size 4 --max-tokens 8192
    devicemap plan ORG/NAME --revision main --quantize 4bit --max-memory 0=24GiB,1=24GiB
    devicemap generate [MODEL] "What is machine learning?" --device-map auto --max-new-tokens 50
    devicemap generate ORG/NAME --revision main "What is machine learning?"
    devicemap check [MODEL] --max-memory cpu=1GiB --batch-size 2 --max-tokens 1024
    devicemap clean [FOLDER] [--yes]
"""

# torch and transformers take seconds to import; `devicemap --help`, a mistyped flag or a bad
# size must answer at once. So this module imports them, and every part of devicemap that
# imports them, inside the functions that run a command: the one place in devicemap where
# function-level imports pay for themselves.
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import DeviceMapError
from .units import split_assignments

_STRATEGY_HELP = (
    "auto, balanced, balanced_low_0, sequential, one device (0, cuda:1, cpu), "
    "or a JSON file holding a manual map or a saved plan"
)
_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_LOAD_DTYPES = ("float32", "float16", "bfloat16")
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
_BARE_NUMBER = re.compile(r"\s*\d+(\.\d*)?\s*")
_SEPARATOR = "-" * 40

# --quantize values: bitsandbytes settings, as transformers' BitsAndBytesConfig takes them.
_QUANTIZE = {"4bit": {"load_in_4bit": True}, "8bit": {"load_in_8bit": True}}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # argparse gives a subcommand's positionals only the words before its first option, so
    # "generate MODEL --revision R PROMPT" leaves PROMPT over: it belongs to the words.
    if extra and (not hasattr(args, "words") or any(word.startswith("-") and word != "-" for word in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.words += extra
    console = _console()
    try:
        return args.run(args)
    except DeviceMapError as error:
        console.print(f"[bold red]error:[/] {error}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devicemap", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"devicemap {_version()}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    plan_command = commands.add_parser("plan", help="plan where each part of a model goes; loads nothing")
    plan_command.add_argument("model", help="model folder, config.json, or Hub id ORG/NAME")
    plan_command.add_argument("--revision", help="branch, tag or commit of a Hub id (default: main)")
    _add_trust_option(plan_command)
    plan_command.add_argument(
        "--quantize", choices=sorted(_QUANTIZE), help="plan it quantized while loading, by bitsandbytes"
    )
    plan_command.add_argument("--strategy", default="auto", help=_STRATEGY_HELP)
    _add_placement_options(plan_command)
    _add_workload_options(plan_command)
    plan_command.add_argument("--json", action="store_true", help="print the plan as JSON, with its device_map")
    plan_command.add_argument(
        "--map", action="store_true", help="print only the device_map that from_pretrained(device_map=...) takes"
    )
    plan_command.add_argument("--pipeline", type=int, metavar="N", help="plan N pipeline stages, one per rank")
    plan_command.set_defaults(run=_run_plan)

    generate = commands.add_parser("generate", help="generate text with a model spread over the devices")
    generate.add_argument(
        "words", nargs="*", metavar="[MODEL] PROMPT",
        help="a model folder or Hub id ORG/NAME (default: the demo model), then prompts; '-' reads a prompt from "
             "standard input",
    )  # fmt: skip
    generate.add_argument("--revision", help="branch, tag or commit of a Hub id (default: main)")
    _add_trust_option(generate)
    generate.add_argument("--file", action="append", default=[], metavar="PATH", help="read a prompt from a file")
    generate.add_argument("--device-map", default="auto", help=_STRATEGY_HELP)
    _add_placement_options(generate)
    generate.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    generate.add_argument("--quantize", choices=sorted(_QUANTIZE), help="quantize it while loading, by bitsandbytes")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--system", help="a system message for the chat template (implies --chat)")
    generate.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    generate.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this probability")
    generate.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    generate.add_argument("--repetition-penalty", type=float, help="above 1 discourages repeating tokens")
    generate.add_argument("--seed", type=int, help="seed of the sampling, for repeatable runs")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT appears")
    generate.add_argument("--threads", type=int, help="CPU threads torch uses (default: torch's choice)")
    generate.add_argument("--json", action="store_true", help="print the generations as JSON, with counts and times")
    generate.add_argument("--pipeline", type=int, metavar="N", help="run N pipeline stages in N processes")
    generate.set_defaults(run=_run_generate)

    check = commands.add_parser(
        "check", help="run a plan's workload on random tokens and measure each device against what it reserved"
    )
    check.add_argument("model", nargs="?", help="a model folder or Hub id ORG/NAME (default: the demo model)")
    check.add_argument("--revision", help="branch, tag or commit of a Hub id (default: main)")
    _add_trust_option(check)
    check.add_argument("--device-map", default="auto", help=_STRATEGY_HELP)
    _add_placement_options(check)
    _add_workload_options(check)
    check.set_defaults(run=_run_check)

    clean = commands.add_parser("clean", help="remove offload folders left behind by processes that were killed")
    clean.add_argument("folder", nargs="?", help="the offload folder (default: the system temp folder)")
    clean.add_argument("--yes", action="store_true", help="remove them (default: only list them)")
    clean.set_defaults(run=_run_clean)
    return parser


def _version() -> str:
    try:
        return version("devicemap")
    except PackageNotFoundError:
        return "(not installed)"


def _add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="run the modeling code the model ships (its config.json's auto_map); only for a model you trust",
    )  # fmt: skip


def _add_workload_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, help="sequences at once (default 1)")
    parser.add_argument(
        "--max-tokens", type=int,
        help="prompt and generated tokens per sequence (default: the longest up to 4096 that fits)",
    )  # fmt: skip


def _add_placement_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", help="budgets, e.g. 0=24GiB,1=24GiB,cpu=64GiB (default: free memory)")
    parser.add_argument("--dtype", help="load dtype: float32, float16 or bfloat16 (default: the checkpoint's)")
    parser.add_argument("--kv-dtype", help="dtype of the KV cache (default: --dtype)")
    parser.add_argument(
        "--prefill-chunk", type=int, metavar="N",
        help="prompt tokens per prefill forward (default: a chunk the plan prints; 0: each prompt at once)",
    )  # fmt: skip
    parser.add_argument("--offload-folder", help="where converted weights offloaded to disk are written")
    parser.add_argument("--no-offload", action="store_true", help="fail rather than offload to CPU or disk")


def _device_map_argument(value: str):
    """A strategy or device as given, or the manual map or saved plan a JSON file holds."""
    from .planning.plan import Plan

    if not value.endswith(".json"):
        return int(value) if value.isdigit() else value
    try:
        text = Path(value).read_text()
    except OSError as error:
        raise DeviceMapError(f"cannot read device map file {value!r}: {error.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DeviceMapError(f"device map file {value!r} is not JSON: {error}") from None
    return Plan.from_json(text) if "placements" in data else data


def _run_plan(args) -> int:
    from .devices import runtime_reserves
    from .pipeline.api import plan_stages
    from .planning.planner import make_plan
    from .runtime.api import profile_of

    workload = _asked_workload(args)
    placement = _placement(args)
    if args.pipeline:
        if args.quantize or args.revision:
            raise DeviceMapError("--pipeline plans a local model as it is stored; drop --quantize and --revision")
        stage_plan = plan_stages(
            args.model, args.pipeline, workload=workload, trust_remote_code=args.trust_remote_code, **placement
        )
        print(json.dumps(asdict(stage_plan), indent=1) if args.json else stage_plan)
        return 0
    profile = profile_of(
        args.model, placement["dtype"], quantization_config=_quantization(args), revision=args.revision,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    budgets, notes = _planning_budgets(args.max_memory, args.offload_folder)

    def plan_with(strategy):
        return make_plan(profile, budgets, workload, strategy, placement["offload"], runtime_reserves(budgets))

    result = plan_with(_device_map_argument(args.strategy))
    if args.map:
        print(json.dumps(result.device_map, indent=1))
    elif args.json:
        print(json.dumps({"device_map": result.device_map, **json.loads(result.to_json())}, indent=1))
    else:
        same = [name for name in _STRATEGIES if _places_alike(result, plan_with, name)]
        notes += [f"{', '.join(same)} give this same plan"] if len(same) > 1 else []
        print("\n".join([str(result), *(f"- {note}" for note in notes)]))
    return 0


def _asked_workload(args):
    """The workload the options ask for; None when none is asked for, and the plan takes the longest that fits."""
    from .workload import Workload

    asked = (args.batch_size, args.max_tokens, args.kv_dtype, args.prefill_chunk) != (None, None, None, None)
    batch_size = 1 if args.batch_size is None else args.batch_size
    return Workload(batch_size, args.max_tokens, args.kv_dtype, args.prefill_chunk) if asked else None


def _planning_budgets(max_memory: str | None, offload_folder: str | None) -> tuple[dict[str, int], list[str]]:
    """Budgets for a machine that is not this one leave this machine's free disk out, unless disk is named."""
    from .devices import available_devices, parse_max_memory, planning_budgets

    budgets = planning_budgets(max_memory, offload_folder)
    named = parse_max_memory(max_memory)
    lacking = [device for device in named if device not in available_devices()]
    if not lacking or "disk" in named:
        return budgets, []
    note = f"no disk budget, as this machine lacks {', '.join(lacking)}; add disk=SIZE to --max-memory to offload"
    return {device: size for device, size in budgets.items() if device != "disk"}, [note]


def _places_alike(result, plan_with: Callable, strategy: str) -> bool:
    """Whether ``strategy`` places every block as ``result`` does, planned by ``plan_with`` as ``result`` was."""
    try:
        return plan_with(strategy).placements == result.placements
    except DeviceMapError:
        return False  # a strategy that does not fit gives no plan to compare


def _quantization(args):
    """The bitsandbytes settings ``--quantize`` asks for, or None."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**_QUANTIZE[args.quantize]) if args.quantize else None


def _placement(args) -> dict:
    """The placement options, checked, as keyword arguments of ``plan``, ``load``, ``plan_stages`` and ``Pipeline``."""
    _check_max_memory(args.max_memory)
    _check_offload_folder(args.offload_folder)
    return dict(
        dtype=_load_dtype(args.dtype), max_memory=args.max_memory, offload=not args.no_offload,
        offload_folder=args.offload_folder,
    )  # fmt: skip


def _check_max_memory(text: str | None) -> None:
    """A bare number is bytes to the Python API, but on the command line ``cpu=10`` almost always meant GiB."""
    if text is None:
        return
    for device, size in split_assignments(text, key="DEVICE", example="0=24GiB,cpu=64GiB"):
        if _BARE_NUMBER.fullmatch(size):
            raise DeviceMapError(
                f"--max-memory {device}={size} has no unit; write {device}={size.strip()}GiB "
                f"(or {size.strip()}MB, {size.strip()}B: units are B, KB, MB, GB, KiB, MiB, GiB, TiB)"
            )


def _check_offload_folder(folder: str | None) -> None:
    """An offload folder that cannot be written would count as a disk with 0 bytes free: say why instead."""
    if folder is None:
        return
    path = Path(folder).expanduser().absolute()
    existing = next(parent for parent in (path, *path.parents) if parent.exists())
    if not existing.is_dir():
        raise DeviceMapError(f"--offload-folder {folder} cannot be used: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryDirectory(dir=existing):
            pass
    except OSError as error:
        raise DeviceMapError(
            f"--offload-folder {folder} cannot be used: nothing can be created in {existing} ({error.strerror}); "
            "name a folder on a disk you can write"
        ) from None
    if shutil.disk_usage(existing).free == 0:
        raise DeviceMapError(f"--offload-folder {folder} cannot be used: the disk of {existing} has 0 bytes free")


def _load_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in _LOAD_DTYPES:
        raise DeviceMapError(
            f"--dtype {dtype} is not a dtype devicemap loads weights in; use {', '.join(_LOAD_DTYPES)}. For 8- or "
            "4-bit weights, give a checkpoint quantized beforehand (GPTQ, AWQ, bitsandbytes, FP8): its layout is "
            "used as it is"
        )
    return name


@dataclass(frozen=True)
class Generation:
    """One prompt's answer, with what it cost."""

    prompt: str
    text: str
    prompt_tokens: int
    new_tokens: int
    seconds: float


def _run_generate(args) -> int:
    _check_generation_options(args)
    model, prompts = _split_model_and_prompts(args.words)
    prompts = [*_read_prompts(prompts), *(_read_file(path) for path in args.file)]
    _check_prompts(prompts)
    model_path = _model_folder(model, args)
    tokenizer = _tokenizer(model_path, args.trust_remote_code)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not args.pipeline:
        return _generate_here(model_path, tokenizer, prompts, args)
    if args.quantize:
        raise DeviceMapError("--pipeline loads the model as it is stored; drop --quantize, or drop --pipeline")
    from .runtime.prompts import tokenize

    inputs = tokenize(tokenizer, prompts, args.chat or args.system is not None, args.system)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _generate_as_rank(model_path, tokenizer, inputs, args)
    return _generate_in_pipeline(model_path, tokenizer, inputs, args)


def _check_generation_options(args) -> None:
    if args.max_new_tokens < 1:
        raise DeviceMapError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise DeviceMapError(f"--threads {args.threads} must be at least 1")
    if args.temperature < 0:
        raise DeviceMapError(f"--temperature {args.temperature} must be 0 (greedy) or more")
    sampling = {"--top-p": args.top_p, "--top-k": args.top_k, "--seed": args.seed}
    given = [flag for flag, value in sampling.items() if value is not None]
    if given and args.temperature == 0:
        raise DeviceMapError(f"{', '.join(given)} only matter when sampling; add --temperature, e.g. 0.7")
    if args.pipeline and (args.temperature or args.repetition_penalty or args.stop or args.json):
        raise DeviceMapError(
            "--pipeline decodes greedily and prints text; drop --temperature, --repetition-penalty, --stop and --json"
        )
    if args.pipeline and args.prefill_chunk is not None:
        raise DeviceMapError("--pipeline prefills each prompt in one forward; drop --prefill-chunk")


def _split_model_and_prompts(words: list[str]) -> tuple[Path | str | None, list[str]]:
    """The model (a folder, a Hub id, or None for the demo model) and the prompts.

    A first word that looks like a path must be a model folder, or a Hub id when no such
    folder exists: a typo must not become a prompt.
    """
    from .storage.hub import is_hub_id

    if not words or not _looks_like_path(words[0]):
        return None, words
    if not Path(words[0]).expanduser().exists() and is_hub_id(words[0]):
        return words[0], words[1:]
    return _existing_folder(words[0]), words[1:]


def _existing_folder(word: str) -> Path:
    folder = Path(word).expanduser()
    if not folder.exists():
        raise DeviceMapError(
            f"model folder {word} does not exist; name a folder holding config.json, or leave the model "
            "out to use the demo model"
        )
    if not (folder / "config.json").is_file():
        raise DeviceMapError(f"{word} is not a model folder: it has no config.json")
    return folder


def _model_folder(model: Path | str | None, args) -> Path:
    """The folder to load: the demo model's, a folder as given, or a Hub id's snapshot in the Hugging Face cache."""
    from .storage.demo import demo_model_path
    from .storage.reference import model_folder

    if model is None and args.revision is not None:
        raise DeviceMapError(f"--revision {args.revision} applies to a Hub id ORG/NAME; name one before the prompt")
    return model_folder(demo_model_path() if model is None else model, args.revision, args.trust_remote_code)


def _looks_like_path(word: str) -> bool:
    return word != "-" and ("/" in word or Path(word).expanduser().exists())


def _read_prompts(words: list[str]) -> list[str]:
    return [sys.stdin.read() if word == "-" else word for word in words]


def _read_file(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as error:
        raise DeviceMapError(f"cannot read prompt file {path}: {error.strerror}") from None


def _check_prompts(prompts: list[str]) -> None:
    if not prompts:
        raise DeviceMapError("no prompt given; write it after the model, e.g. devicemap generate \"Hello\"")
    for number, prompt in enumerate(prompts, 1):
        if not prompt.strip():
            raise DeviceMapError(f"prompt {number} of {len(prompts)} is empty; give it some text")


def _tokenizer(model_path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    if not any((model_path / name).is_file() for name in _TOKENIZER_FILES):
        raise DeviceMapError(
            f"model folder {model_path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}); copy them "
            "from the model's original repository"
        )
    return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def _check_device_exists(device_map) -> None:
    """A single accelerator that this machine lacks, said plainly before the planner asks for its budget."""
    from .devices import available_devices, normalize_device

    if not isinstance(device_map, (int, str)) or device_map in _STRATEGIES:
        return
    device = normalize_device(device_map)
    if device not in available_devices():
        raise DeviceMapError(
            f"--device-map {device_map} means {device}, and this machine has no {device} (it has "
            f"{', '.join(available_devices())}); use --device-map auto or cpu"
        )


def _generate_here(model_path: Path, tokenizer, prompts: list[str], args) -> int:
    from .runtime.load import load
    from .runtime.measure import measurement, track_peaks
    from .runtime.prompts import tokenize
    from .workload import Workload

    device_map = _device_map_argument(args.device_map)
    _check_device_exists(device_map)
    encoded = [tokenize(tokenizer, [prompt], args.chat or args.system is not None, args.system) for prompt in prompts]
    longest = max(inputs["input_ids"].shape[1] for inputs in encoded)
    workload = Workload(1, longest + args.max_new_tokens, args.kv_dtype, args.prefill_chunk)
    model = load(
        model_path, device_map=device_map, workload=workload, quantization_config=_quantization(args),
        trust_remote_code=args.trust_remote_code, **_placement(args),
    )  # fmt: skip
    console = _console()
    console.print(str(model.devicemap_plan), soft_wrap=True)
    generations = []
    with track_peaks(model) as peaks:
        for number, (prompt, inputs) in enumerate(zip(prompts, encoded)):
            if number and not args.json:
                print(_SEPARATOR, flush=True)
            generations.append(_generate_one(model, tokenizer, prompt, inputs, args))
            if not args.json:
                _print_speed(generations[-1].new_tokens, generations[-1].seconds)
    if args.json:
        print(json.dumps([asdict(generation) for generation in generations], indent=1))
    run = f"{len(prompts)} prompt(s) of up to {longest} tokens + up to {args.max_new_tokens} new"
    note = "a process's first run includes what the runtime sets up once (a few MiB); devicemap check leaves it out"
    _print_measurement(measurement(model.devicemap_plan, peaks, run), [note])
    return 0


def _run_check(args) -> int:
    """Exit 1 when a device used more than the plan reserved: a plan below its run can run out of memory."""
    from .runtime.load import load
    from .runtime.measure import measure_run

    model_path = _model_folder(args.model, args)
    device_map = _device_map_argument(args.device_map)
    _check_device_exists(device_map)
    model = load(model_path, device_map=device_map, workload=_asked_workload(args), **_placement(args))
    _console().print(str(model.devicemap_plan), soft_wrap=True)
    measured = measure_run(model)
    _print_measurement(measured, measured.verdicts())
    return 1 if measured.over_plan() else 0


def _print_measurement(measured, verdicts: list[str]) -> None:
    console = _console()
    console.print(measured.table())
    for line in [*measured.summary(), *verdicts]:
        console.print(line, soft_wrap=True)


def _generate_one(model, tokenizer, prompt: str, inputs: dict, args) -> Generation:
    """Generate for one prompt, streaming its text to stdout unless the output is JSON."""
    from transformers import TextStreamer, set_seed

    if args.seed is not None:
        set_seed(args.seed)
    streamer = None if args.json else TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    started = time.perf_counter()
    output = model.generate(**inputs, **_sampling(args), streamer=streamer, tokenizer=tokenizer,
                            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    seconds = time.perf_counter() - started
    prompt_tokens = inputs["input_ids"].shape[1]
    new_tokens = output[0, prompt_tokens:]
    text = tokenizer.decode(new_tokens, skip_special_tokens=True)
    return Generation(prompt, text, prompt_tokens, len(new_tokens), round(seconds, 3))


def _sampling(args) -> dict:
    """transformers' ``generate`` arguments for the sampling flags."""
    options = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.temperature > 0:
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.repetition_penalty is not None:
        options["repetition_penalty"] = args.repetition_penalty
    if args.stop:
        options["stop_strings"] = args.stop
    return {name: value for name, value in options.items() if value is not None}


def _generate_in_pipeline(model_path: Path, tokenizer, inputs: dict, args) -> int:
    """``--pipeline N``: N processes started here."""
    from .pipeline.api import Pipeline
    from .pipeline.requests import special_tokens
    from .workload import Workload

    batch_size, prompt_tokens = inputs["input_ids"].shape
    workload = Workload(batch_size, prompt_tokens + args.max_new_tokens, args.kv_dtype)
    with Pipeline(
        model_path, stages=args.pipeline, workload=workload, trust_remote_code=args.trust_remote_code,
        **_placement(args),
    ) as pipe:
        _console().print(pipe.stage_plan.table())
        started = time.perf_counter()
        output = pipe.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - started
    new_tokens = output[:, prompt_tokens:]
    _print_texts(tokenizer, new_tokens)
    _print_speed(int((new_tokens != special_tokens(model_path, pipe.config)[1]).sum()), seconds)
    return 0


def _generate_as_rank(model_path: Path, tokenizer, inputs: dict, args) -> int:
    """``--pipeline N`` under torchrun: this process is one rank; every rank tokenizes the same prompts."""
    from .model.skeleton import load_config
    from .pipeline.api import generate_as_rank
    from .pipeline.requests import special_tokens

    output = generate_as_rank(
        model_path, inputs["input_ids"], inputs["attention_mask"], stages=args.pipeline,
        max_new_tokens=args.max_new_tokens, dtype=_load_dtype(args.dtype), max_memory=args.max_memory,
        trust_remote_code=args.trust_remote_code,
    )  # fmt: skip
    if output is None:
        return 0
    _console().print(output.stage_plan.table())
    _print_texts(tokenizer, output.new_tokens)
    pad_token_id = special_tokens(model_path, load_config(model_path, args.trust_remote_code))[1]
    _print_speed(int((output.new_tokens != pad_token_id).sum()), output.seconds)
    return 0


def _print_texts(tokenizer, new_tokens) -> None:
    for number, text in enumerate(tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
        if number:
            print(_SEPARATOR)
        print(text)


def _print_speed(generated: int, seconds: float) -> None:
    _console().print(f"{generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s")


def _console():
    """Tables, progress and errors go to stderr, so that stdout holds only what was asked for."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _run_clean(args) -> int:
    from .storage.offload import offload_parent, remove_stale, stale_folders
    from .units import format_size

    parent = offload_parent(args.folder)
    if not parent.is_dir():
        raise DeviceMapError(f"offload folder {parent} does not exist; name the folder that loads were given")
    stale = remove_stale(parent) if args.yes else stale_folders(parent)
    for folder in stale:
        print(f"{format_size(folder.size_bytes):>10}  {folder.path}  (process {folder.owner.pid}, gone)")
    total = format_size(sum(folder.size_bytes for folder in stale))
    if args.yes:
        print(f"removed {len(stale)} offload folder(s), {total}")
        for kept in stale_folders(parent):
            print(f"could not remove {kept.path}: check its permissions")
    elif stale:
        print(f"{len(stale)} offload folder(s), {total}, left by processes that are gone; pass --yes to remove them")
    else:
        print(f"no offload folders left by processes that are gone in {parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
