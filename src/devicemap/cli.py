"""The devicemap command line: a thin shell over the public API.

    devicemap plan MODEL --max-memory 0=24GiB,1=24GiB,cpu=64GiB --strategy auto --batch-size 4 --max-tokens 8192
    devicemap plan ORG/NAME --revision main --quantize 4bit --max-memory 0=24GiB,1=24GiB
    devicemap generate [MODEL] "What is machine learning?" --device-map auto --max-new-tokens 50
"""

import argparse
import json
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console

from .errors import DeviceMapError
from .planning.plan import Plan
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
    console = Console(stderr=True, highlight=False)
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

    plan = commands.add_parser("plan", help="plan where each part of a model goes; loads nothing")
    plan.add_argument("model", help="model folder, config.json, or Hub id ORG/NAME")
    plan.add_argument("--revision", help="branch, tag or commit of a Hub id (default: main)")
    plan.add_argument(
        "--quantize", choices=sorted(_QUANTIZE), help="plan it quantized while loading, by bitsandbytes"
    )
    plan.add_argument("--strategy", default="auto", help=_STRATEGY_HELP)
    _add_placement_options(plan)
    plan.add_argument("--batch-size", type=int, default=1, help="sequences at once (default 1)")
    plan.add_argument("--max-tokens", type=int, help="tokens per sequence (default: context or 4096)")
    plan.add_argument("--kv-dtype", help="dtype of the KV cache (default: --dtype)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--pipeline", type=int, metavar="N", help="plan N pipeline stages, one per rank")
    plan.set_defaults(run=_run_plan)

    generate = commands.add_parser("generate", help="generate text with a model spread over the devices")
    generate.add_argument(
        "words", nargs="+", metavar="[MODEL] PROMPT", help="a model folder (default: the demo model), then prompts"
    )
    generate.add_argument("--device-map", default="auto", help=_STRATEGY_HELP)
    _add_placement_options(generate)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument("--pipeline", type=int, metavar="N", help="run N pipeline stages in N processes")
    generate.set_defaults(run=_run_generate)
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
    from transformers import BitsAndBytesConfig

    from .runtime.api import plan

    workload = Workload(args.batch_size, args.max_tokens, args.kv_dtype)
    if args.pipeline:
        from .pipeline.api import plan_stages

        if args.quantize or args.revision:
            raise DeviceMapError("--pipeline plans a local model as it is stored; drop --quantize and --revision")

        stages = plan_stages(
            args.model,
            args.pipeline,
            dtype=args.dtype,
            max_memory=args.max_memory,
            workload=workload,
            offload=not args.no_offload,
            offload_folder=args.offload_folder,
        )
        print(stages)
        return 0
    result = plan(
        args.model,
        _device_map_argument(args.strategy),
        dtype=args.dtype,
        max_memory=args.max_memory,
        workload=workload,
        offload=not args.no_offload,
        offload_folder=args.offload_folder,
        quantization_config=BitsAndBytesConfig(**_QUANTIZE[args.quantize]) if args.quantize else None,
        revision=args.revision,
    )
    print(result.to_json() if args.json else result)
    return 0


def _run_generate(args) -> int:
    model_path, prompts = _split_model_and_prompts(args.words)
    if args.pipeline:
        from .pipeline.api import generate_cli

        return generate_cli(model_path, prompts, args)
    return _generate_here(model_path, prompts, args)


def _split_model_and_prompts(words: list[str]) -> tuple[Path, list[str]]:
    if len(words) > 1 and Path(words[0]).is_dir():
        return Path(words[0]), words[1:]
    from .storage.demo import demo_model_path

    return demo_model_path(), words


def _generate_here(model_path: Path, prompts: list[str], args) -> int:
    from transformers import AutoTokenizer, TextStreamer

    from .pipeline.requests import tokenize
    from .runtime.load import load

    console = Console(stderr=True, highlight=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    inputs = tokenize(tokenizer, prompts, args.chat)
    prompt_tokens = inputs["input_ids"].shape[1]
    workload = Workload(len(prompts), prompt_tokens + args.max_new_tokens)
    resident_before_bytes = psutil.Process().memory_info().rss
    model = load(
        model_path,
        device_map=_device_map_argument(args.device_map),
        max_memory=args.max_memory,
        dtype=args.dtype,
        workload=workload,
        offload_folder=args.offload_folder,
        offload=not args.no_offload,
    )
    plan = model.devicemap_plan
    console.print(str(plan), soft_wrap=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if len(prompts) == 1 else None
    started = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    elapsed = time.perf_counter() - started
    new_tokens = output[:, prompt_tokens:]
    if streamer is None:
        for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True):
            print(text)
    generated = int((new_tokens != (tokenizer.pad_token_id or -1)).sum())
    console.print(f"\n{generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tokens/s")
    console.print(memory_report(plan, resident_before_bytes), soft_wrap=True)
    return 0


def memory_report(plan: Plan, resident_before_bytes: int) -> str:
    """Per device, the memory the plan predicted beside what this process used.

    CUDA: peak allocated bytes; CPU: resident memory of the process, beside what it held
    before loading (the Python runtime, torch, the tokenizer); it also counts the pages of
    memory-mapped weights the run touched, which the kernel may reclaim.
    """
    import torch

    from .units import format_size

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
