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

from ..errors import CheckpointError, PipelineError
from ..model.skeleton import build_on_meta, config_dtype, load_config
from ..planning.plan import Placement
from ..runtime.dispatch import attach
from ..runtime.materialize import CheckpointTensors, PlacedBlock, block_tensors, materialize
from ..runtime.sliding import trim_windows_after
from ..storage.checkpoint import Checkpoint, open_checkpoint
from ..storage.keys import KeyReport, compare_keys
from ..storage.sources import SourceMap, map_sources

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
    """A rank's stage, ready to run micro-batches; see the module docstring and ``build_stage``."""

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
    trust_remote_code: bool = False,
) -> StageModel:
    """Build the stage holding ``blocks`` (profile block names) and load its tensors onto ``device``.

    ``dtype`` defaults to the one the config names, as for the profile. ``offloaded`` maps
    blocks the stage keeps off ``device`` to "cpu" or "disk"; disk blocks that need a dtype
    conversion are written into a folder of devicemap's own inside ``offload_folder``. A model
    that ships its own modeling code is built from it only with ``trust_remote_code``.

    Only the stage's tensors are read from the checkpoint, lazily, so host memory stays
    near the stage's own size.

    >>> import tempfile
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
    ...                      num_attention_heads=2)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     LlamaForCausalLM(config).save_pretrained(folder)
    ...     last = ("model.layers.1", "model.norm", "lm_head")
    ...     stage = build_stage(folder, last, torch.device("cpu"), offloaded={"model.layers.1": "disk"})
    ...     hidden = torch.zeros(1, 3, 8)
    ...     stage.forward(hidden, None, torch.arange(3)[None], stage.new_cache()).shape
    torch.Size([1, 16])
    """
    checkpoint = open_checkpoint(folder)
    config = load_config(checkpoint.folder, trust_remote_code)
    check_supported(config)
    load_dtype = dtype or config_dtype(config)
    model = build_on_meta(config, load_dtype, trust_remote_code).eval()
    layout = _layout_of(model, blocks)
    _drop_other_stages(model, layout)
    placed = _stage_blocks(model, layout, device, offloaded or {})
    sources = map_sources(model, checkpoint.shapes)
    _check_stage_tensors(checkpoint, sources, model, placed)
    tensors = CheckpointTensors(checkpoint, sources, model, load_dtype)
    materialize(placed, tensors, offload_folder=offload_folder, owner=model)
    _rebuild_buffers(model, device)
    _require_materialized(model, placed)
    if offloaded:
        attach(model, placed)
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


def _stage_blocks(
    model: PreTrainedModel, layout: StageLayout, device: torch.device, offloaded: Mapping[str, str]
) -> list[PlacedBlock]:
    """The stage's modules as placed blocks in execution order: computing on ``device``, offloaded on their tier."""
    compute = str(device) if device.type == "cpu" or device.index is not None else f"{device.type}:0"
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    modules = sorted(_stage_modules(model, layout).items(), key=lambda item: order[item[0]])
    return [
        PlacedBlock(Placement(name, offloaded.get(name, compute), compute), module, block_tensors(module, name))
        for name, module in modules
    ]


def _check_stage_tensors(
    checkpoint: Checkpoint, sources: SourceMap, model: PreTrainedModel, blocks: list[PlacedBlock]
) -> None:
    """Refuse a checkpoint that lacks a tensor of this stage or holds one of another shape; others' do not count."""
    names = {tensor.name for block in blocks for tensor in block.tensors}
    report = compare_keys(sources.found_shapes, model)
    stage = KeyReport(
        missing=tuple(name for name in report.missing if name in names),
        mismatched=tuple(mismatch for mismatch in report.mismatched if mismatch.name in names),
    )
    if not stage.ok:
        raise CheckpointError(
            f"checkpoint {checkpoint.folder} does not match its config for this pipeline stage: "
            f"{'; '.join(stage.describe().splitlines())}; the weights and config.json must come from the same model"
        )


def _rebuild_buffers(model: PreTrainedModel, device: torch.device) -> None:
    """Compute the rotary embedding's buffers for real (the checkpoint does not hold them)."""
    decoder = model.get_decoder()
    rotary = decoder.rotary_emb
    decoder.rotary_emb = type(rotary)(config=rotary.config).to(device)


def _require_materialized(model: PreTrainedModel, blocks: list[PlacedBlock]) -> None:
    """Fail clearly, before any request, if a tensor the stage computes with was never loaded."""
    tensors = [tensor for block in blocks for tensor in block.tensors]
    tensors += block_tensors(model.get_decoder().rotary_emb, "rotary_emb")
    left = [tensor.name for tensor in tensors if tensor.value.is_meta]
    if left:
        raise PipelineError(
            f"{len(left)} tensor(s) of this stage are neither in the checkpoint nor computed at build time: "
            f"{', '.join(left[:10])}; this architecture needs devicemap.load instead of the pipeline"
        )
