"""What the CUDA paths decide, run on the CPU with the facts given as data.

A converted tensor crosses to its device piece by piece; ``dispatch`` counts what a module
already holds on each device as room it has; bfloat16 is refused on a GPU without it. The
same functions run on a GPU in the tests marked ``gpu`` (``python -m benchmarks gpu``).
"""

import pytest
import torch
from safetensors.torch import load_file
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from devicemap.runtime import materialize
from devicemap.runtime.load import load
from devicemap.runtime.materialize import copy_converted

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _allocations_bytes(function) -> list[int]:
    """The size of each tensor ``function`` allocates on the CPU, as torch's profiler records them."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as recorded:
        function()
    return sorted(event.cpu_memory_usage for event in recorded.events() if event.name == "aten::empty")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 1000), (10, 1024)])
def test_a_tensor_converted_in_pieces_equals_torchs_own_conversion(monkeypatch, shape, dtype):
    monkeypatch.setattr(materialize, "_DEVICE_PIECE_ELEMENTS", 1024)
    tensor = torch.randn(shape) * 1e3
    converted = copy_converted(tensor, "cpu", dtype)
    assert converted.dtype == dtype and converted.shape == tensor.shape
    assert torch.equal(converted, tensor.to(dtype))


def test_converting_in_pieces_allocates_the_result_and_one_piece_at_the_files_dtype(monkeypatch):
    monkeypatch.setattr(materialize, "_DEVICE_PIECE_ELEMENTS", 1000)
    tensor = torch.randn(10, 1234)
    allocated = _allocations_bytes(lambda: copy_converted(tensor, "cpu", torch.bfloat16))
    assert allocated == [1000 * 4, tensor.numel() * 2]


@gpu
@needs_cuda
def test_a_converting_load_onto_a_gpu_holds_no_whole_tensor_at_the_files_dtype(tmp_path):
    folder = tmp_path / "embedding"
    folder.mkdir()
    config = LlamaConfig(vocab_size=4096, hidden_size=4096, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=32, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats("cuda:0")
    loaded = load(folder, device_map="cuda:0", dtype=torch.bfloat16)
    held = torch.cuda.memory_allocated("cuda:0")
    peak = torch.cuda.max_memory_allocated("cuda:0")
    assert peak - held <= materialize._DEVICE_PIECE_ELEMENTS * 4 + 2**20, "one float32 piece, not the embedding"
    expected = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    assert torch.equal(loaded.model.embed_tokens.weight.cpu(), expected.to(torch.bfloat16))
