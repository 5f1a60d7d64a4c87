"""Decode speed of the demo model quantized to 4 bits: in memory, half and all of its layers on disk.

    python -m benchmarks.quantized_speed            # best of 3, 32 new tokens, one torch thread
    python -m benchmarks.quantized_speed --quick    # one run of 8 tokens

Each map runs through devicemap (``load(quantization_config=...)``: disk layers hold the
packed 4-bit bytes in offload files) and through transformers (``from_pretrained(
quantization_config=..., device_map=...)`` with the same map; transformers keeps the layers
it offloads unquantized, which bitsandbytes asks for with ``llm_int8_enable_fp32_cpu_offload``).
"""

import argparse
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import devicemap
from devicemap.storage.demo import demo_model_path

LAYERS = 30
MAPS = {
    "in memory": {"": "cpu"},
    "half on disk": {
        "": "cpu",
        **{f"model.layers.{i}": "disk" for i in range(LAYERS // 2, LAYERS)},
    },
    "all on disk": {"": "cpu", **{f"model.layers.{i}": "disk" for i in range(LAYERS)}},
}
PROMPT = "What is machine learning?"


def tokens_per_second(model, inputs: dict, new_tokens: int, runs: int) -> float:
    """The best of ``runs`` greedy generations of exactly ``new_tokens`` tokens, in tokens per second."""
    best_seconds = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        best_seconds = min(best_seconds, time.perf_counter() - started)
    return new_tokens / best_seconds


def load_devicemap(path, device_map: dict, folder: str):
    return devicemap.load(path, device_map=device_map, offload_folder=folder,
                          quantization_config=BitsAndBytesConfig(load_in_4bit=True))  # fmt: skip


def load_transformers(path, device_map: dict, folder: str):
    offloads = set(device_map.values()) != {"cpu"}
    config = BitsAndBytesConfig(load_in_4bit=True, llm_int8_enable_fp32_cpu_offload=offloads)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device_map,
                                                offload_folder=folder)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run of 8 tokens")
    args = parser.parse_args(argv)
    new_tokens, runs = (8, 1) if args.quick else (32, 3)
    torch.set_num_threads(1)
    path = demo_model_path()
    inputs = dict(AutoTokenizer.from_pretrained(path)(PROMPT, return_tensors="pt"))
    print(f"demo model, 4-bit, {new_tokens} new tokens, best of {runs}, 1 torch thread")
    for name, device_map in MAPS.items():
        for loader in (load_devicemap, load_transformers):
            with tempfile.TemporaryDirectory() as folder:
                try:
                    model = loader(path, device_map, folder)
                    speed = f"{tokens_per_second(model, inputs, new_tokens, runs):6.2f} tokens/s"
                except (ValueError, RuntimeError, ImportError) as error:  # reported, not fatal
                    speed = f"failed: {str(error).splitlines()[0][:100]}"
            print(f"{name:>13}  {loader.__name__.removeprefix('load_'):>12}  {speed}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
