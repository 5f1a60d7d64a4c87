"""What the CUDA paths decide, run on the CPU with the facts given as data.

A converted tensor crosses to its device piece by piece; ``dispatch`` counts what a module
already holds on each device as room it has; bfloat16 is refused on a GPU without it. The
same functions run on a GPU in the tests marked ``gpu`` (``python -m benchmarks gpu``).
"""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaConfig, LlamaForCausalLM

from devicemap.errors import DeviceMapError
from devicemap.model.profile import profile_module
from devicemap.planning.planner import make_plan
from devicemap.runtime import materialize
from devicemap.runtime.dispatch import dispatch, held_bytes, remove_dispatch, with_held_bytes
from devicemap.runtime.dtype_support import BFLOAT16_CAPABILITY, check_dtype_supported
from devicemap.runtime.load import load
from devicemap.runtime.materialize import copy_converted
from devicemap.workload import Workload

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


def _tied_model() -> nn.Module:
    embedding, head = nn.Embedding(64, 32), nn.Linear(32, 64, bias=False)
    head.weight = embedding.weight
    model = nn.Sequential(embedding, nn.Linear(32, 32), head)
    model.register_buffer("scale", torch.ones(8), persistent=False)
    return model


def test_a_module_holds_the_bytes_of_its_parameters_and_buffers_each_shared_tensor_once():
    model = _tied_model()
    assert held_bytes(model) == {"cpu": (64 * 32 + 32 * 32 + 32 + 8) * 4}
    assert held_bytes(_tied_model().to("meta")) == {}


def test_what_a_module_holds_on_a_device_is_added_to_that_devices_free_memory_only():
    budgets = {"cuda:0": 2**30, "cuda:1": 2**30, "cpu": 2**34, "disk": 2**40}
    held = {"cuda:0": 3 * 2**20, "cpu": 5}
    assert with_held_bytes(budgets, held) == {"cuda:0": 2**30 + 3 * 2**20, "cuda:1": 2**30, "cpu": 2**34 + 5,
                                              "disk": 2**40}  # fmt: skip


@pytest.mark.parametrize("device", ["cuda:0", "cpu"])
def test_a_module_that_fits_where_it_sits_is_planned_to_stay_there(device):
    model = nn.Sequential(*(nn.Linear(256, 256) for _ in range(4)))
    weights = sum(held_bytes(model).values())
    # What the device reports free once the module is on it: room for half of it, and its work.
    free_now = {"cpu": 2**24, "disk": 2**30} | {device: weights // 2 + 2**17}
    held = {device: weights}
    workload = Workload(batch_size=1, max_tokens=16)
    plan = make_plan(profile_module(model), free_now, workload, "auto")
    assert {placement.device for placement in plan.placements} != {device}
    plan = make_plan(profile_module(model), with_held_bytes(free_now, held), workload, "auto")
    assert {placement.device for placement in plan.placements} == {device}


@gpu
@needs_cuda
def test_dispatching_auto_a_module_that_fits_on_its_gpu_keeps_it_all_there():
    model = nn.Sequential(*(nn.Linear(4096, 4096) for _ in range(4))).to("cuda:0")
    weights = sum(held_bytes(model).values())
    # Its work in the default workload takes about its weights again: free room for 1.5 times
    # them plus a margin fits it only when the weights already there count.
    free, _ = torch.cuda.mem_get_info(0)
    filler = torch.empty(free - weights * 3 // 2 - 2**26, dtype=torch.uint8, device="cuda:0")
    try:
        dispatch(model, "auto")
        assert set(model.hf_device_map.values()) == {0}
    finally:
        del filler
        remove_dispatch(model)


@pytest.mark.parametrize("capability", [(6, 1), (7, 0), (7, 5)])
def test_bfloat16_on_a_gpu_before_ampere_is_an_error_naming_it_its_capability_and_what_to_use(capability):
    with pytest.raises(DeviceMapError) as raised:
        check_dtype_supported("cuda:1", torch.bfloat16, capability)
    message = str(raised.value)
    assert "cuda:1" in message and f"compute capability {capability[0]}.{capability[1]}" in message
    assert "torch.float16" in message and "torch.float32" in message


@pytest.mark.parametrize(
    ("dtype", "capability"),
    [(torch.bfloat16, (8, 0)), (torch.bfloat16, (9, 0)), (torch.float16, (7, 0)), (torch.float32, (6, 1)),
     (torch.bfloat16, None)],
)  # fmt: skip
def test_other_dtypes_gpus_from_ampere_on_and_devices_without_a_capability_pass(dtype, capability):
    check_dtype_supported("cuda:0", dtype, capability)


def test_bfloat16_on_the_cpu_and_on_disk_is_placed_without_a_question():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).to(torch.bfloat16)
    dispatch(model, {"0": "cpu", "1": "disk"})
    assert model(torch.ones(1, 2, dtype=torch.bfloat16)).dtype == torch.bfloat16


@gpu
@needs_cuda
def test_bfloat16_onto_this_gpu_is_refused_before_anything_moves_exactly_when_it_lacks_it():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).to(torch.bfloat16)
    if torch.cuda.get_device_capability(0) >= BFLOAT16_CAPABILITY:
        dispatch(model, "cuda:0")
        assert model[0].weight.device == torch.device("cuda:0")
        return
    with pytest.raises(DeviceMapError, match="compute capability"):
        dispatch(model, "cuda:0")
    assert model[0].weight.device == torch.device("cpu")
