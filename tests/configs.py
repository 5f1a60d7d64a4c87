"""Published configs of real architectures, written out in code (no model hub is reachable)."""

from functools import cache

from transformers import (
    BertConfig,
    DeepseekV3Config,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen3MoeConfig,
    T5Config,
)

from devicemap.profile import Profile, profile_config

REAL_CONFIGS = {
    "llama-3-8b": lambda: LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
    ),
    "llama-3-70b": lambda: LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
    ),
    "llama-3.1-405b": lambda: LlamaConfig(
        hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
    ),
    "mixtral-8x7b": lambda: MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768,
    ),
    "qwen3-30b-a3b": lambda: Qwen3MoeConfig(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        vocab_size=151936, max_position_embeddings=40960,
    ),
    "deepseek-v3": DeepseekV3Config,  # its defaults are the published 671B model
    "mistral-7b": lambda: MistralConfig(  # a sliding window of 4096 tokens
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, sliding_window=4096, vocab_size=32000, max_position_embeddings=32768,
    ),
    "gpt2": lambda: GPT2Config(architectures=["GPT2LMHeadModel"]),
    "t5-base": lambda: T5Config(
        d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12, architectures=["T5ForConditionalGeneration"],
    ),
    "bert-base": lambda: BertConfig(architectures=["BertForMaskedLM"]),
}  # fmt: skip


def real_config(name: str) -> PretrainedConfig:
    return REAL_CONFIGS[name]()


@cache
def real_profile(name: str, dtype: str = "bfloat16") -> Profile:
    """The profile of a real architecture, built on the meta device from its config."""
    return profile_config(real_config(name), dtype)
