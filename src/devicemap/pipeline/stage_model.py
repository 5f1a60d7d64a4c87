"""One rank's stage of a decoder-only model: built on meta, only its own tensors loaded.

A stage is the model's own transformers class, built on the ``meta`` device (no memory),
in which the decoder layers of other stages are replaced by a pass-through and never
loaded. It runs the model's own base-model forward, so masks, rotary embeddings and the
KV cache are transformers' own and the numbers are those of the single-process model:
the first stage embeds token ids, later stages take the hidden states as
``inputs_embeds``, the norm runs on the stage that holds it, and the last stage applies
the head to the last position. Its ``DynamicCache`` holds the stage's layers; the slots
of other stages' layers are ``DummyLayer``s, so cache lengths and masks come from this
stage's own layers while layer indices keep their meaning.

Blocks the stage plan offloads stay in the rank's host memory or on its disk (the
checkpoint's own mapping when the dtype matches, else a file devicemap writes) and are
hooked by the runtime's ``dispatch.attach``: computed from the mapping on a CPU rank,
streamed to the GPU on a GPU rank.
"""

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DummyLayer, DynamicSlidingWindowLayer

from ..errors import PipelineError
from ..model.profile import Block, Profile
from ..model.skeleton import build_on_meta, config_dtype, load_config
from ..planning.plan import Placement, Plan
from ..runtime.dispatch import attach
from ..runtime.paging import file_backed, page_ranges
from ..runtime.sliding import trim_windows_after
from ..storage.checkpoint import Checkpoint, open_checkpoint
from ..storage.offload import OffloadFiles
from ..workload import Workload, dtype_name
from .tensors import read_stage_state

# Decoder-only architectures whose base model is exactly embed_tokens → layers → norm and
# whose causal LM is exactly lm_head(hidden states): models that scale embeddings inside
# the forward (Gemma, Granite) or post-process logits (softcapping, Cohere's logit scale)
# would be wrong when split. Each gives transformers' own tokens in tests/test_pipeline.py.
SUPPORTED_MODEL_TYPES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
    "apertus", "arcee", "exaone4", "glm", "helium", "hunyuan_v1_dense", "ministral", "olmo", "olmo2",
    "olmo3", "phi3", "seed_oss", "smollm3", "stablelm",
)  # fmt: skip


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer held by another stage: hidden states pass unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@dataclass(frozen=True)
class StageLayout:
    """Which parts of the model's standard layout one stage holds."""

    embeds: bool
    layers: tuple[int, ...]
    norm: bool
    head: bool


class StageModel:
    """A rank's stage, ready to run micro-batches; see the module docstring.

    >>> stage = build_stage("smollm2", ("lm_head", "model.norm"), torch.device("cpu"))  # doctest: +SKIP
    >>> stage.forward(hidden, mask, positions, stage.new_cache()).shape  # doctest: +SKIP
    torch.Size([4, 49152])
    """

    def __init__(self, model: PreTrainedModel, layout: StageLayout, device: torch.device):
        self.model = model
        self.layout = layout
        self.device = device
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.hidden_size = model.config.hidden_size
        self.dtype = model.dtype
        forward_parameters = inspect.signature(self.decoder.forward).parameters
        # transformers 5 renamed past_key_values to cache
        self._cache_argument = "cache" if "cache" in forward_parameters else "past_key_values"
        self._hold_windows()

    def _hold_windows(self) -> None:
        """Hook the stage's sliding-window layers so that each keeps only its window once it has run."""
        layers = DynamicCache(config=self.model.config).layers
        for index in self.layout.layers:
            if isinstance(layers[index], DynamicSlidingWindowLayer):
                hook = trim_windows_after((index,))
                self.decoder.layers[index].register_forward_hook(hook, with_kwargs=True)

    def new_cache(self) -> DynamicCache | None:
        """An empty KV cache for one micro-batch, with slots only for this stage's layers."""
        if not self.layout.layers:
            return None
        cache = DynamicCache(config=self.model.config)
        owned = set(self.layout.layers)
        for index in range(len(cache.layers)):
            if index not in owned:
                cache.layers[index] = DummyLayer()
        return cache

    @torch.inference_mode()
    def forward(
        self,
        inputs: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: DynamicCache | None,
    ) -> torch.Tensor:
        """Token ids (first stage) or hidden states in; hidden states, or the last position's
        float32 logits (last stage), out."""
        first_input = {"input_ids": inputs} if self.layout.embeds else {"inputs_embeds": inputs}
        output = self.decoder(
            **first_input,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **{self._cache_argument: cache},
        )
        hidden = output.last_hidden_state
        if not self.layout.head:
            return hidden
        return self.head(hidden[:, -1:, :])[:, -1].to(torch.float32)


def build_stage(
    folder: str | Path,
    blocks: tuple[str, ...],
    device: torch.device,
    dtype: torch.dtype | None = None,
    offloaded: Mapping[str, str] | None = None,
    offload_folder: str | os.PathLike | None = None,
) -> StageModel:
    """Build the stage holding ``blocks`` (profile block names) and load its tensors onto ``device``.

    ``dtype`` defaults to the one the config names, as for the profile. ``offloaded`` maps
    blocks the stage keeps off ``device`` to "cpu" or "disk"; disk blocks that need a dtype
    conversion are written into a folder of devicemap's own inside ``offload_folder``.

    Only the stage's tensors are read from the checkpoint, lazily, so host memory stays
    near the stage's own size.

    >>> blocks = ("model.embed_tokens", "model.layers.0")
    >>> stage = build_stage(demo_model_path(), blocks, torch.device("cpu"), offloaded={"model.layers.0": "disk"})  # doctest: +SKIP
    """
    checkpoint = open_checkpoint(folder)
    config = load_config(checkpoint.folder)
    check_supported(config)
    offloaded = dict(offloaded or {})
    model = build_on_meta(config, dtype or config_dtype(config)).eval()
    layout = _layout_of(model, blocks)
    _drop_other_stages(model, layout)
    files = OffloadFiles(offload_folder)
    try:
        _load_tensors(model, checkpoint, layout, device, offloaded, files)
        files.commit(model)
    except BaseException:
        files.discard()
        raise
    _rebuild_buffers(model, device)
    _require_materialized(model, layout)
    if offloaded:
        attach(model, _local_plan(model, layout, device, offloaded))
    return StageModel(model, layout, device)


def check_supported(config) -> None:
    """Refuse a model type the pipeline cannot split, naming those it can.

    >>> from transformers import GPT2Config
    >>> check_supported(GPT2Config())
    Traceback (most recent call last):
    devicemap.errors.PipelineError: model type 'gpt2' is not supported by the pipeline, ...
    """
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PipelineError(
            f"model type {config.model_type!r} is not supported by the pipeline, which splits models whose "
            f"base model is embed_tokens → layers → norm followed by lm_head: {', '.join(SUPPORTED_MODEL_TYPES)}; "
            "run it with devicemap.load and a device map instead"
        )


def _layout_of(model: PreTrainedModel, blocks: tuple[str, ...]) -> StageLayout:
    """Map profile block names onto the standard layout; anything else with weights is refused."""
    modules = dict(model.named_modules())
    name_of = {id(module): name for name, module in modules.items()}
    decoder = model.get_decoder()
    layers_name = name_of[id(decoder.layers)]
    embed_name = name_of[id(model.get_input_embeddings())]
    norm_name = name_of[id(decoder.norm)]
    head_name = name_of[id(model.get_output_embeddings())]
    layer_index = {f"{layers_name}.{index}": index for index in range(len(decoder.layers))}
    known = {embed_name, norm_name, head_name, *layer_index}
    unknown = [name for name in blocks if name not in known and _holds_weights(modules.get(name))]
    if unknown:
        raise PipelineError(
            f"stage blocks {', '.join(unknown)} are not part of the layout the pipeline splits "
            f"({embed_name}, {layers_name}.N, {norm_name}, {head_name}); run this model with devicemap.load instead"
        )
    return StageLayout(
        embeds=embed_name in blocks,
        layers=tuple(sorted(layer_index[name] for name in blocks if name in layer_index)),
        # A norm without weights (OLMo's) is no block: the stage with the head, which follows it, runs it.
        norm=norm_name in blocks or (head_name in blocks and not _holds_tensors(decoder.norm)),
        head=head_name in blocks,
    )


def _holds_weights(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def _holds_tensors(module: nn.Module) -> bool:
    return _holds_weights(module) or any(True for _ in module.buffers())


def _drop_other_stages(model: PreTrainedModel, layout: StageLayout) -> None:
    """Replace what other stages compute by pass-throughs; their weights stay on meta, unused."""
    decoder = model.get_decoder()
    owned = set(layout.layers)
    for index in range(len(decoder.layers)):
        if index not in owned:
            decoder.layers[index] = _SkippedLayer()
    if not layout.norm:
        decoder.norm = nn.Identity()


def _stage_modules(model: PreTrainedModel, layout: StageLayout) -> dict[str, nn.Module]:
    """The modules whose tensors this stage loads, by their name in the model."""
    decoder = model.get_decoder()
    name_of = {id(module): name for name, module in model.named_modules()}
    chosen = [decoder.layers[index] for index in layout.layers]
    if layout.embeds:
        chosen.append(model.get_input_embeddings())
    if layout.norm:
        chosen.append(decoder.norm)
    if layout.head:
        chosen.append(model.get_output_embeddings())
    return {name_of[id(module)]: module for module in chosen}


def _load_tensors(
    model: PreTrainedModel,
    checkpoint: Checkpoint,
    layout: StageLayout,
    device: torch.device,
    offloaded: Mapping[str, str],
    files: OffloadFiles,
) -> None:
    """Assign the stage's tensors from the checkpoint: each straight onto ``device``, or kept on its tier."""
    state = {}
    for prefix, module in _stage_modules(model, layout).items():
        names = [f"{prefix}.{name}" for name in module.state_dict()]
        tier = offloaded.get(prefix)
        block_state = read_stage_state(model, checkpoint, names, torch.device("cpu") if tier else device)
        if tier == "disk":
            block_state = _on_disk(prefix, block_state, files)
        state.update(block_state)
    model.load_state_dict(state, strict=False, assign=True)


def _on_disk(block: str, state: dict[str, torch.Tensor], files: OffloadFiles) -> dict[str, torch.Tensor]:
    """The block's tensors as file mappings: the checkpoint's own, or written once converted."""
    converted = {name: tensor for name, tensor in state.items() if not file_backed(page_ranges([tensor]))}
    if not converted:
        return state
    specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in converted.items()]
    mapped = files.write_block(block, specs, converted.__getitem__)
    # Tied aliases share one tensor, so they follow it by identity.
    by_identity = {id(converted[name]): mapped[name] for name in converted}
    return {name: by_identity.get(id(tensor), tensor) for name, tensor in state.items()}


def _local_plan(
    model: PreTrainedModel, layout: StageLayout, device: torch.device, offloaded: Mapping[str, str]
) -> Plan:
    """The stage's placement for ``dispatch.attach``: offloaded blocks kept on their tier, computed on ``device``."""
    compute = str(device) if device.type == "cpu" or device.index is not None else f"{device.type}:0"
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    modules = dict(sorted(_stage_modules(model, layout).items(), key=lambda item: order[item[0]]))
    blocks = tuple(
        Block(name, 0, tensor_names=tuple(f"{name}.{key}" for key, _ in _own_tensors(module)))
        for name, module in modules.items()
    )
    profile = Profile(type(model).__name__, dtype_name(model.dtype), blocks)
    placements = tuple(Placement(name, offloaded.get(name, compute), compute) for name in modules)
    return Plan(profile, Workload(), (), "pipeline stage", placements)


def _own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _rebuild_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Compute the rotary embedding's buffers for real (the checkpoint does not hold them)."""
    decoder = model.get_decoder()
    rotary = decoder.rotary_emb
    decoder.rotary_emb = type(rotary)(config=rotary.config).to(device)


def _require_materialized(model: PreTrainedModel, layout: StageLayout) -> None:
    """Fail clearly, before any request, if a tensor the stage computes with was never loaded."""
    modules = {**_stage_modules(model, layout), "rotary_emb": model.get_decoder().rotary_emb}
    left = [
        f"{prefix}.{name}"
        for prefix, module in modules.items()
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
        if tensor.is_meta
    ]
    if left:
        raise PipelineError(
            f"{len(left)} tensor(s) of this stage are neither in the checkpoint nor computed at build time: "
            f"{', '.join(left[:10])}; this architecture needs devicemap.load instead of the pipeline"
        )
