"""Load a model folder straight onto the devices a plan gives, then hook it to run there.

The model is built on the meta device and planned; ``materialize`` then puts each
checkpoint tensor where its block lives, at the load dtype, without a copy where the
file's own mapping will do; what the checkpoint lacks (tied weights saved once,
non-persistent buffers) is made last, where it computes.
"""

import functools
import os
import traceback
import warnings
from collections.abc import Mapping

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..devices import DeviceLike, check_devices_exist, loading_budgets, runtime_reserves
from ..errors import CheckpointError
from ..model.profile import profile_module
from ..model.quantized import quantize_on_meta
from ..model.skeleton import build_on_meta, config_dtype, load_config
from ..model.stored import require_dense_to_quantize
from ..planning.plan import Plan
from ..planning.planner import make_plan
from ..storage.checkpoint import Checkpoint, open_checkpoint
from ..storage.keys import check_keys
from ..storage.offload import OffloadFiles
from ..storage.reference import checkpoint_layout, model_folder
from ..storage.sources import SourceMap, map_sources
from ..workload import Workload, dtype_name
from .dispatch import DEFAULT_PREFETCH_DEPTH, attach, check_prefetch_depth, set_prefill_chunk
from .materialize import CheckpointTensors, PlacedBlock, blocks_of, materialize
from .quantize import quantize_blocks, refuse_unloadable, shapes_as_read, without_quantized


def _frees_on_failure(function):
    """A failed call's frames hold what it built (a half-loaded model); clear them as the error leaves.

    Otherwise that memory stays held for as long as the caller keeps the exception.
    """

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BaseException as error:
            traceback.clear_frames(error.__traceback__)
            raise

    return call


@_frees_on_failure
def load(
    model: str | os.PathLike,
    *,
    device_map: str | DeviceLike | Mapping[str, DeviceLike] | Plan = "auto",
    max_memory: Mapping[DeviceLike, int | str] | str | None = None,
    dtype: torch.dtype | str | None = None,
    workload: Workload | None = None,
    offload_folder: str | os.PathLike | None = None,
    offload: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    progress: bool | None = None,
    prefetch_depth: int = DEFAULT_PREFETCH_DEPTH,
    disk_resident_bytes: int | None = None,
    quantization_config: QuantizationConfigMixin | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """Load the model folder or Hub id ``model`` across devices as ``device_map`` says, ready for ``generate``.

    A Hub id ``ORG/NAME`` is fetched at ``revision`` into the Hugging Face cache first (its
    safetensors weights, config and tokenizer files, and its code with ``trust_remote_code``;
    ``HF_HOME``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE`` apply) and loaded from there.

    ``device_map`` is "auto", "balanced", "balanced_low_0", "sequential", a dict of
    module-name prefixes to devices, one device, or a ``Plan``; ``max_memory`` sets
    budgets (default: what is free now). ``dtype`` ``None`` keeps the checkpoint's.
    Weights converted for disk go into a folder of devicemap's own inside
    ``offload_folder`` (default: the system temp folder). ``progress`` shows a progress
    bar (``None``: when stderr is a terminal). The model gets ``hf_device_map`` and
    ``devicemap_plan``; ``prefetch_depth`` and ``disk_resident_bytes`` are as for ``dispatch``.
    ``quantization_config`` (transformers' ``BitsAndBytesConfig``) quantizes the weights while
    loading, 4-bit or 8-bit; blocks on disk then hold the packed bytes. A folder saved quantized
    by bitsandbytes loads as it is stored, without ``quantization_config``. ``generate`` prefills
    in the chunks the plan reserved activations for (``Workload.prefill_chunk``), through
    ``generation_config.prefill_chunk_size``.

    >>> import tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
    ...                      num_attention_heads=2)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     LlamaForCausalLM(config).save_pretrained(folder)
    ...     model = load(folder, device_map={"": "cpu", "model.layers.1": "disk"}, offload_folder=folder)
    ...     model(torch.tensor([[1, 2, 3]])).logits.shape
    torch.Size([1, 3, 16])
    """
    check_prefetch_depth(prefetch_depth)
    checkpoint = open_checkpoint(model_folder(model, revision, trust_remote_code), allow_pickle=allow_pickle)
    config = load_config(checkpoint.folder, trust_remote_code)
    load_dtype = _load_dtype(dtype, config, checkpoint)
    refuse_unloadable(config)
    skeleton = build_on_meta(config, load_dtype, trust_remote_code)
    stored = checkpoint_layout(skeleton, checkpoint.tensors)
    require_dense_to_quantize(skeleton, stored, quantization_config)
    built = quantize_on_meta(skeleton, quantization_config, load_dtype)
    # Profiled before the keys are compared: it checks a declared quantization against the stored tensors.
    profile = profile_module(built, load_dtype, stored=stored)
    sources = map_sources(built, checkpoint.shapes)
    check_keys(shapes_as_read(sources.found_shapes, built), built, source=str(checkpoint.folder))
    plan = _plan(profile, device_map, max_memory, workload, offload, offload_folder)
    blocks = blocks_of(built, plan)
    _require_placed(blocks, sources)
    tensors = CheckpointTensors(checkpoint, sources, built, load_dtype)
    materialize(without_quantized(blocks), tensors, offload_folder=offload_folder, owner=built, progress=progress)
    _quantize(blocks, tensors, load_dtype, offload_folder, built)
    _finish_tensors(built, blocks, sources)
    built.eval()
    built.hf_device_map = plan.device_map
    built.devicemap_plan = plan
    _warn_past_workload(built, plan.workload)
    if (checkpoint.folder / "generation_config.json").is_file() and built.can_generate():
        built.generation_config = GenerationConfig.from_pretrained(checkpoint.folder)
    set_prefill_chunk(built, plan)
    return attach(built, blocks, prefetch_depth=prefetch_depth, disk_resident_bytes=disk_resident_bytes)


def _quantize(blocks: list[PlacedBlock], tensors: CheckpointTensors, dtype, offload_folder, owner: nn.Module) -> None:
    files = OffloadFiles(offload_folder)
    try:
        quantize_blocks(blocks, tensors, dtype, files)
        files.commit(owner)
    except BaseException:
        files.discard()
        raise


def _load_dtype(dtype, config, checkpoint: Checkpoint) -> torch.dtype:
    """The requested dtype; else the config's, as transformers' ``dtype="auto"``; else the checkpoint's."""
    if dtype is not None:
        return getattr(torch, dtype_name(dtype))
    if getattr(config, "dtype", None) is not None or getattr(config, "torch_dtype", None) is not None:
        return config_dtype(config)
    floating = [info.dtype for info in checkpoint.tensors.values() if info.dtype.is_floating_point]
    return floating[0] if floating else torch.float32


def _plan(profile, device_map, max_memory, workload, offload, offload_folder) -> Plan:
    if isinstance(device_map, Plan):
        check_devices_exist({d for p in device_map.placements for d in (p.device, p.execution_device)})
        return device_map
    budgets = loading_budgets(max_memory, offload_folder)
    return make_plan(profile, budgets, workload, device_map, offload, runtime_reserves(budgets))


def _require_placed(blocks: list[PlacedBlock], sources: SourceMap) -> None:
    placed = {tensor.name for block in blocks for tensor in block.tensors}
    unplaced = sorted(set(sources.sources) - placed)
    if unplaced:
        raise CheckpointError(
            f"the plan places no block holding {', '.join(unplaced[:5])}; it was made for another model "
            "or another version of it: make the plan again from this folder"
        )


def _finish_tensors(model: nn.Module, blocks: list[PlacedBlock], sources: SourceMap) -> None:
    """Tie shared weights, then make what the checkpoint lacks (non-persistent buffers) where it computes."""
    if isinstance(model, PreTrainedModel):
        missing = set(model.state_dict(keep_vars=True)) - set(sources.sources)
        model.tie_weights(missing_keys=missing, recompute_mapping=False)
    made = False
    for block in blocks:
        for tensor in block.tensors:
            if tensor.value.is_meta:
                empty = torch.empty_like(tensor.value, device=block.placement.execution_device)
                tensor.owner[tensor.key] = nn.Parameter(empty, requires_grad=False) if tensor.is_parameter else empty
                made = True
    if made and isinstance(model, PreTrainedModel):
        model.initialize_weights()


def _warn_past_workload(model: nn.Module, workload: Workload) -> None:
    """Warn once, on the first forward past the planned batch × tokens: its reserves were sized for less.

    The check wraps this model's ``forward`` rather than adding a hook, so that the hooks stay
    dispatch's alone; once it has warned, the plain ``forward`` is back.
    """
    planned = workload.batch_size * workload.max_tokens
    forward = model.forward

    @functools.wraps(forward)
    def checked(*args, **kwargs):
        inputs = kwargs.get("input_ids", args[0] if args else None)
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 passes it as ``cache``
        cached = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if inputs is not None and inputs.shape[0] * (cached + inputs.shape[1]) > planned:
            del model.forward
            warnings.warn(
                f"this forward runs {inputs.shape[0]} × {cached + inputs.shape[1]:,} tokens, past the "
                f"{workload.batch_size} × {workload.max_tokens:,} the plan reserved KV cache and activations "
                "for; it may run out of memory: plan again with a larger Workload",
                stacklevel=2,
            )
        return forward(*args, **kwargs)

    model.forward = checked
