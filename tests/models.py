"""Small random-weight models of real architectures, saved as real checkpoints.

Each kind is a transformers config small enough to build in milliseconds but with
the structure that matters to devicemap: several decoder layers, grouped-query
attention, tied or untied embeddings, experts, an encoder and a decoder. Weights are
seeded, so a kind, dtype and seed always give the same tensors.

    folder = save_random_model("llama", tmp_path / "llama", dtype=torch.bfloat16, shards=3)
    reference = build_random_model("llama", dtype=torch.bfloat16)   # the same weights, in memory
"""

from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

try:
    # transformers 5 fuses some weights in memory (MoE experts) but saves them in the
    # layout published checkpoints have (one tensor per expert); save_pretrained uses this.
    from transformers.core_model_loading import revert_weight_conversion
except ImportError:  # transformers 4 saves tensors as the modules hold them

    def revert_weight_conversion(model: PreTrainedModel, state_dict: dict) -> dict:
        return state_dict


from devicemap.storage.shards import write_sharded

_VOCAB = 512
_LLAMA = dict(
    vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256,
)  # fmt: skip
_CONFIGS = {
    "llama": lambda: LlamaConfig(**_LLAMA, tie_word_embeddings=False),
    "llama-tied": lambda: LlamaConfig(**_LLAMA, tie_word_embeddings=True),
    "qwen3-moe": lambda: Qwen3MoeConfig(
        vocab_size=_VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
    ),
    "gpt2": lambda: GPT2Config(
        vocab_size=_VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256, bos_token_id=0, eos_token_id=0,
    ),
    "t5": lambda: T5Config(
        vocab_size=_VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=3, num_decoder_layers=3, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ),
    "bert": lambda: BertConfig(
        vocab_size=_VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=256,
    ),
}  # fmt: skip
_CLASSES = {
    "llama": LlamaForCausalLM,
    "llama-tied": LlamaForCausalLM,
    "qwen3-moe": Qwen3MoeForCausalLM,
    "gpt2": GPT2LMHeadModel,
    "t5": T5ForConditionalGeneration,
    "bert": BertForMaskedLM,
}
# Decoder-only types the pipeline splits, each built from the same small shape by its own config class.
DECODER_TYPES = (
    "apertus", "arcee", "exaone4", "glm", "helium", "hunyuan_v1_dense", "ministral", "olmo", "olmo2", "olmo3",
    "phi3", "seed_oss", "smollm3", "stablelm",
)  # fmt: skip
_DECODER = dict(**_LLAMA, head_dim=16, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
for _type in DECODER_TYPES:
    _CONFIGS[_type] = lambda model_type=_type: AutoConfig.for_model(model_type, **_DECODER)
KINDS = tuple(_CONFIGS)


def random_config(kind: str) -> PretrainedConfig:
    """The small config of ``kind`` (one of ``KINDS``), naming its model class in ``architectures``.

    >>> random_config("gpt2").n_layer
    4
    """
    if kind not in _CONFIGS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of {', '.join(KINDS)}")
    config = _CONFIGS[kind]()
    config.architectures = [_model_class(kind, config).__name__]
    return config


def _model_class(kind: str, config: PretrainedConfig) -> type:
    return _CLASSES.get(kind) or MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def build_random_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> PreTrainedModel:
    """A CPU model of ``kind`` in eval mode whose weights depend only on ``seed`` (then cast to ``dtype``).

    >>> build_random_model("bert").config.hidden_size
    64
    """
    config = random_config(kind)
    torch.manual_seed(seed)
    model = _model_class(kind, config)(config)
    config.dtype = dtype
    return model.to(dtype).eval()


def save_random_model(
    kind: str, folder: Path, dtype: torch.dtype = torch.float32, shards: int = 3, seed: int = 0
) -> Path:
    """Save ``build_random_model(kind, dtype, seed)`` as a Hugging Face folder and return it.

    The folder holds ``shards`` safetensors files (plus an index when more than one),
    ``config.json`` and, for generative models, ``generation_config.json``; tied
    weights are stored once, as transformers stores them.

    >>> sorted(p.name for p in save_random_model("llama", Path("out"), shards=2).iterdir())[:2]  # doctest: +SKIP
    ['config.json', 'generation_config.json']
    """
    model = build_random_model(kind, dtype, seed)
    folder.mkdir(parents=True, exist_ok=True)
    write_sharded(folder, revert_weight_conversion(model, model.state_dict()), shards)
    model.config.save_pretrained(folder)
    if model.can_generate():
        model.generation_config.save_pretrained(folder)
    return folder
