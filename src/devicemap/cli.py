"""The devicemap command line: a thin shell over the public API.

    devicemap plan MODEL --max-memory 0=24GiB,1=24GiB,cpu=64GiB --strategy auto --batch-size 4 --max-tokens 8192
    devicemap plan ORG/NAME --revision main --quantize 4bit --max-memory 0=24GiB,1=24GiB
    devicemap generate [MODEL] "What is machine learning?" --device-map auto --max-new-tokens 50
    devicemap clean [FOLDER] [--yes]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from transformers import AutoTokenizer, BitsAndBytesConfig, TextStreamer

from .errors import DeviceMapError
from .model.skeleton import load_config
from .pipeline.api import Pipeline, generate_as_rank, plan_stages
from .pipeline.requests import special_tokens
from .planning.plan import Plan
from .runtime.api import plan
from .runtime.load import load
from .runtime.prompts import tokenize
from .storage.demo import demo_model_path
from .storage.offload import offload_parent, remove_stale, stale_folders
from .units import format_size
from .workload import Workload

_STRATEGY_HELP = (
    "auto, balanced, balanced_low_0, sequential, one device (0, cuda:1, cpu), "
    "or a JSON file holding a manual map or a saved plan"
)

# --quantize values: bitsandbytes settings, as transformers' BitsAndBytesConfig takes them.
_QUANTIZE = {"4bit": {"load_in_4bit": True}, "8bit": {"load_in_8bit": True}}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = _parser().parse_args(argv)
    console = _console()
    try:
        return args.run(args)
    except DeviceMapError as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="devicemap", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    plan_command = commands.add_parser("plan", help="plan where each part of a model goes; loads nothing")
    plan_command.add_argument("model", help="model folder, config.json, or Hub id ORG/NAME")
    plan_command.add_argument("--revision", help="branch, tag or commit of a Hub id (default: main)")
    plan_command.add_argument(
        "--quantize", choices=sorted(_QUANTIZE), help="plan it quantized while loading, by bitsandbytes"
    )
    plan_command.add_argument("--strategy", default="auto", help=_STRATEGY_HELP)
    _add_placement_options(plan_command)
    plan_command.add_argument("--batch-size", type=int, default=1, help="sequences at once (default 1)")
    plan_command.add_argument("--max-tokens", type=int, help="tokens per sequence (default: context or 4096)")
    plan_command.add_argument("--kv-dtype", help="dtype of the KV cache (default: --dtype)")
    plan_command.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_command.add_argument("--pipeline", type=int, metavar="N", help="plan N pipeline stages, one per rank")
    plan_command.set_defaults(run=_run_plan)

    generate = commands.add_parser("generate", help="generate text with a model spread over the devices")
    generate.add_argument(
        "words", nargs="+", metavar="[MODEL] PROMPT", help="a model folder (default: the demo model), then prompts"
    )
    generate.add_argument("--device-map", default="auto", help=_STRATEGY_HELP)
    _add_placement_options(generate)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--quantize", choices=sorted(_QUANTIZE), help="quantize it while loading, by bitsandbytes")
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--pipeline", type=int, metavar="N", help="run N pipeline stages in N processes")
    generate.set_defaults(run=_run_generate)

    clean = commands.add_parser("clean", help="remove offload folders left behind by processes that were killed")
    clean.add_argument("folder", nargs="?", help="the offload folder (default: the system temp folder)")
    clean.add_argument("--yes", action="store_true", help="remove them (default: only list them)")
    clean.set_defaults(run=_run_clean)
    return parser


def _add_placement_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", help="budgets, e.g. 0=24GiB,1=24GiB,cpu=64GiB (default: free memory)")
    parser.add_argument("--dtype", help="load dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--offload-folder", help="where converted weights offloaded to disk are written")
    parser.add_argument("--no-offload", action="store_true", help="fail rather than offload to CPU or disk")


def _device_map_argument(value: str):
    """A strategy or device as given, or the manual map or saved plan a JSON file holds."""
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
    workload = Workload(args.batch_size, args.max_tokens, args.kv_dtype)
    if args.pipeline:
        if args.quantize or args.revision:
            raise DeviceMapError("--pipeline plans a local model as it is stored; drop --quantize and --revision")
        print(plan_stages(args.model, args.pipeline, workload=workload, **_placement(args)))
        return 0
    quantization = _quantization(args)
    result = plan(
        args.model, _device_map_argument(args.strategy), workload=workload, quantization_config=quantization,
        revision=args.revision, **_placement(args),
    )  # fmt: skip
    print(result.to_json() if args.json else result)
    return 0


def _quantization(args) -> BitsAndBytesConfig | None:
    return BitsAndBytesConfig(**_QUANTIZE[args.quantize]) if args.quantize else None


def _placement(args) -> dict:
    """The placement options as keyword arguments of ``plan``, ``load``, ``plan_stages`` and ``Pipeline``."""
    return dict(
        dtype=args.dtype, max_memory=args.max_memory, offload=not args.no_offload, offload_folder=args.offload_folder
    )


def _run_generate(args) -> int:
    model_path, prompts = _split_model_and_prompts(args.words)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    inputs = tokenize(tokenizer, prompts, args.chat)
    if not args.pipeline:
        return _generate_here(model_path, tokenizer, inputs, args)
    if args.quantize:
        raise DeviceMapError("--pipeline loads the model as it is stored; drop --quantize, or drop --pipeline")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _generate_as_rank(model_path, tokenizer, inputs, args)
    return _generate_in_pipeline(model_path, tokenizer, inputs, args)


def _split_model_and_prompts(words: list[str]) -> tuple[Path, list[str]]:
    if len(words) > 1 and Path(words[0]).is_dir():
        return Path(words[0]), words[1:]
    return demo_model_path(), words


def _workload(inputs: dict[str, torch.Tensor], args) -> Workload:
    batch_size, prompt_tokens = inputs["input_ids"].shape
    return Workload(batch_size, prompt_tokens + args.max_new_tokens)


def _generate_here(model_path: Path, tokenizer, inputs: dict[str, torch.Tensor], args) -> int:
    resident_before_bytes = psutil.Process().memory_info().rss
    device_map = _device_map_argument(args.device_map)
    model = load(
        model_path, device_map=device_map, workload=_workload(inputs, args), quantization_config=_quantization(args),
        **_placement(args),
    )  # fmt: skip
    _console().print(str(model.devicemap_plan), soft_wrap=True)
    one_prompt = len(inputs["input_ids"]) == 1
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if one_prompt else None
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id
    started = time.perf_counter()
    output = model.generate(
        **inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer, pad_token_id=pad
    )
    seconds = time.perf_counter() - started
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    if streamer is None:
        _print_texts(tokenizer, new_tokens)
    _print_speed(new_tokens, tokenizer.pad_token_id or -1, seconds)
    _console().print(memory_report(model.devicemap_plan, resident_before_bytes), soft_wrap=True)
    return 0


def _generate_in_pipeline(model_path: Path, tokenizer, inputs: dict[str, torch.Tensor], args) -> int:
    """``--pipeline N``: N processes started here."""
    with Pipeline(model_path, stages=args.pipeline, workload=_workload(inputs, args), **_placement(args)) as pipe:
        _console().print(pipe.stage_plan.table())
        started = time.perf_counter()
        output = pipe.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=args.max_new_tokens)
        seconds = time.perf_counter() - started
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    _print_texts(tokenizer, new_tokens)
    _print_speed(new_tokens, special_tokens(model_path, pipe.config)[1], seconds)
    return 0


def _generate_as_rank(model_path: Path, tokenizer, inputs: dict[str, torch.Tensor], args) -> int:
    """``--pipeline N`` under torchrun: this process is one rank; every rank tokenizes the same prompts."""
    output = generate_as_rank(
        model_path, inputs["input_ids"], inputs["attention_mask"], stages=args.pipeline,
        max_new_tokens=args.max_new_tokens, dtype=args.dtype, max_memory=args.max_memory,
    )  # fmt: skip
    if output is None:
        return 0
    _console().print(output.stage_plan.table())
    _print_texts(tokenizer, output.new_tokens)
    _print_speed(output.new_tokens, special_tokens(model_path, load_config(model_path))[1], output.seconds)
    return 0


def _print_texts(tokenizer, new_tokens: torch.Tensor) -> None:
    for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
        print(text)


def _print_speed(new_tokens: torch.Tensor, pad_token_id: int, seconds: float) -> None:
    generated = int((new_tokens != pad_token_id).sum())
    _console().print(f"\n{generated} tokens in {seconds:.2f} s: {generated / seconds:.1f} tokens/s")


def _console() -> Console:
    """Tables, progress and errors go to stderr, so that stdout holds only what was asked for."""
    return Console(stderr=True, highlight=False)


def _run_clean(args) -> int:
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


def memory_report(plan: Plan, resident_before_bytes: int) -> str:
    """Per device, the memory the plan predicted beside what this process used.

    CUDA: peak allocated bytes; CPU: resident memory of the process, beside what it held
    before loading (the Python runtime, torch, the tokenizer); it also counts the pages of
    memory-mapped weights the run touched, which the kernel may reclaim.
    """
    lines = ["memory: device, planned, used"]
    for row in plan.ledger:
        if row.device.startswith("cuda:"):
            used = format_size(torch.cuda.max_memory_allocated(int(row.device[5:])))
        elif row.device == "cpu":
            memory = psutil.Process().memory_info()
            used = (
                f"{format_size(memory.rss)} resident: {format_size(resident_before_bytes)} before loading, "
                f"{format_size(memory.shared)} file-backed (libraries and mapped weights, which the kernel may drop)"
            )
        else:
            continue
        lines.append(f"  {row.device}: planned {format_size(row.used_bytes)}, used {used}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
