"""Model folders that ship their own modeling code, as people bring them from the Hub.

``write_chatglm2`` writes a small model in ChatGLM2-6B's architecture and module names
(``transformer.embedding.word_embeddings``, ``transformer.rotary_pos_emb``,
``transformer.encoder.layers.N``, ``transformer.encoder.final_layernorm``,
``transformer.output_layer``): fused QKV with multi-query attention, rotary embedding as
its own module holding a buffer, and its own cache, a tuple of (key, value) per layer laid
out sequence first. ``write_gpt2_style`` writes one with GPT-2's names (``transformer.wte``,
``transformer.h.N``, ``transformer.ln_f``, ``lm_head``) and a batch-first cache. Both
folders hold config.json with ``auto_map``, their configuration and modeling files, and
seeded random weights; transformers knows neither model type. ``write_llama_style`` writes
a Llama whose repository ships its own patched copy of the code (classes of its own, ReLU
in the MLPs, model type "llama"), as repositories that patch Llama do: the pipeline splits
it like a Llama, and only its own code gives its tokens.

    folder = write_chatglm2(tmp_path / "chatglm2")
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
"""

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from devicemap.storage.shards import write_sharded

CONFIGURATION = '''
from transformers import LlamaConfig, PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"

    def __init__(self, num_layers=3, padded_vocab_size=64, hidden_size=32, ffn_hidden_size=48, kv_channels=8,
                 num_attention_heads=4, multi_query_group_num=2, seq_length=128, layernorm_epsilon=1e-5, **kwargs):
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels
        self.num_attention_heads = num_attention_heads
        self.multi_query_group_num = multi_query_group_num
        self.seq_length = seq_length
        self.layernorm_epsilon = layernorm_epsilon
        super().__init__(**kwargs)


class TinyGPTConfig(PretrainedConfig):
    model_type = "tinygpt"

    def __init__(self, vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=128, **kwargs):
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_positions = n_positions
        super().__init__(**kwargs)


class ShippedLlamaConfig(LlamaConfig):
    model_type = "llama"
'''

MODELING = '''
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_remote import ChatGLMConfig, ShippedLlamaConfig, TinyGPTConfig


@dataclass
class RemoteOutput(ModelOutput):
    logits: torch.Tensor | None = None
    cache: tuple | None = None


class RemoteGenerationMixin(GenerationMixin):
    """The model keeps its own cache (a tuple per layer), so generate must not build one."""

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False

    def prepare_inputs_for_generation(self, input_ids, cache=None, **kwargs):
        if cache is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": True}


def attend(query, key, value):
    """Causal attention over batch-first (batch, heads, tokens, dim); the query's tokens are the last ones."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    past = key.shape[2] - query.shape[2]
    mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril(past)
    return nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)


class RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden * torch.rsqrt(variance + self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, positions):
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        return torch.stack([angles.cos(), angles.sin()], dim=-1)


def rotate(x, rotary):
    """x: (tokens, batch, heads, dim); rotary: (tokens, dim / 2, 2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = rotary[:, None, None, :, 0], rotary[:, None, None, :, 1]
    turned = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin], -1)
    return turned.flatten(-2).type_as(x)


class Embedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids):
        return self.word_embeddings(input_ids).transpose(0, 1)


class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.groups = config.multi_query_group_num
        self.head_dim = config.kv_channels
        qkv_size = (self.heads + 2 * self.groups) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_size, bias=True)
        self.dense = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden, rotary, kv_cache):
        tokens, batch = hidden.shape[:2]
        query, key, value = self.query_key_value(hidden).split(
            [self.heads * self.head_dim, self.groups * self.head_dim, self.groups * self.head_dim], dim=-1
        )
        query = rotate(query.view(tokens, batch, self.heads, self.head_dim), rotary)
        key = rotate(key.view(tokens, batch, self.groups, self.head_dim), rotary)
        value = value.view(tokens, batch, self.groups, self.head_dim)
        if kv_cache is not None:
            key = torch.cat([kv_cache[0], key], dim=0)
            value = torch.cat([kv_cache[1], value], dim=0)
        context = attend(*(t.permute(1, 2, 0, 3) for t in (query, key, value)))
        context = context.permute(2, 0, 1, 3).reshape(tokens, batch, -1)
        return self.dense(context), (key, value)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden):
        gate, up = self.dense_h_to_4h(hidden).chunk(2, dim=-1)
        return self.dense_4h_to_h(nn.functional.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, hidden, rotary, kv_cache=None):
        attended, kv_cache = self.self_attention(self.input_layernorm(hidden), rotary, kv_cache)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), kv_cache


class GLMTransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, hidden, rotary, cache):
        presents = []
        for layer, kv_cache in zip(self.layers, cache or [None] * len(self.layers)):
            hidden, present = layer(hidden, rotary, kv_cache)
            presents.append(present)
        return self.final_layernorm(hidden), tuple(presents)


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GLMBlock"]

    def _init_weights(self, module):
        if isinstance(module, RotaryEmbedding):
            dim = module.inv_freq.shape[0] * 2
            module.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, cache=None):
        past = cache[0][0].shape[0] if cache else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        hidden, presents = self.encoder(self.embedding(input_ids), self.rotary_pos_emb(positions), cache)
        return self.output_layer(hidden).transpose(0, 1), presents


class ChatGLMForConditionalGeneration(RemoteGenerationMixin, ChatGLMPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.post_init()

    def forward(self, input_ids, cache=None, use_cache=True, **kwargs):
        logits, presents = self.transformer(input_ids, cache)
        return RemoteOutput(logits=logits.float(), cache=presents if use_cache else None)


class GPTBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.n_head
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, hidden, layer_past=None):
        batch, tokens, width = hidden.shape
        heads = (t.view(batch, tokens, self.heads, -1).transpose(1, 2)
                 for t in self.c_attn(self.ln_1(hidden)).split(width, dim=-1))
        query, key, value = heads
        if layer_past is not None:
            key = torch.cat([layer_past[0], key], dim=2)
            value = torch.cat([layer_past[1], value], dim=2)
        context = attend(query, key, value).transpose(1, 2).reshape(batch, tokens, width)
        hidden = hidden + self.c_proj(context)
        return hidden + self.mlp(self.ln_2(hidden)), (key, value)


class TinyGPTModel(PreTrainedModel):
    config_class = TinyGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.post_init()

    def forward(self, input_ids, cache=None):
        past = cache[0][0].shape[2] if cache else 0
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        hidden = self.wte(input_ids) + self.wpe(positions)
        presents = []
        for block, layer_past in zip(self.h, cache or [None] * len(self.h)):
            hidden, present = block(hidden, layer_past)
            presents.append(present)
        return self.ln_f(hidden), tuple(presents)


class TinyGPTLMHeadModel(RemoteGenerationMixin, PreTrainedModel):
    config_class = TinyGPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPTBlock"]

    def __init__(self, config):
        super().__init__(config)
        self.transformer = TinyGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, cache=None, use_cache=True, **kwargs):
        hidden, presents = self.transformer(input_ids, cache)
        return RemoteOutput(logits=self.lm_head(hidden).float(), cache=presents if use_cache else None)


class ShippedLlamaForCausalLM(LlamaForCausalLM):
    """Llama with the repository's own change: ReLU in the MLPs, which only this code computes."""

    config_class = ShippedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.mlp.act_fn = nn.ReLU()
'''

CHATGLM2_CONFIG = {
    "model_type": "chatglm",
    "architectures": ["ChatGLMModel"],
    "auto_map": {
        "AutoConfig": "configuration_remote.ChatGLMConfig",
        "AutoModel": "modeling_remote.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_remote.ChatGLMForConditionalGeneration",
    },
    "num_layers": 4,
    "padded_vocab_size": 64,
    "hidden_size": 32,
    "ffn_hidden_size": 48,
    "kv_channels": 8,
    "num_attention_heads": 4,
    "multi_query_group_num": 2,
    "seq_length": 128,
    "dtype": "float32",
}

GPT2_STYLE_CONFIG = {
    "model_type": "tinygpt",
    "architectures": ["TinyGPTLMHeadModel"],
    "auto_map": {
        "AutoConfig": "configuration_remote.TinyGPTConfig",
        "AutoModel": "modeling_remote.TinyGPTLMHeadModel",
        "AutoModelForCausalLM": "modeling_remote.TinyGPTLMHeadModel",
    },
    "vocab_size": 64,
    "n_embd": 32,
    "n_layer": 4,
    "n_head": 4,
    "n_positions": 128,
    "dtype": "float32",
}


LLAMA_STYLE_CONFIG = {
    "model_type": "llama",
    "architectures": ["ShippedLlamaForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_remote.ShippedLlamaConfig",
        "AutoModelForCausalLM": "modeling_remote.ShippedLlamaForCausalLM",
    },
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
    "dtype": "float32",
}


def write_chatglm2(folder: Path, seed: int = 0) -> Path:
    """A ChatGLM2-shaped model folder with its own code and seeded random weights."""
    return _write_remote_model(folder, CHATGLM2_CONFIG, seed)


def write_gpt2_style(folder: Path, seed: int = 0) -> Path:
    """A model folder with GPT-2's module names, its own code and seeded random weights."""
    return _write_remote_model(folder, GPT2_STYLE_CONFIG, seed)


def write_llama_style(folder: Path, seed: int = 0) -> Path:
    """A Llama model folder shipping its own code (model type "llama"), with seeded random weights."""
    return _write_remote_model(folder, LLAMA_STYLE_CONFIG, seed, AutoModelForCausalLM)


def _write_remote_model(folder: Path, config: dict, seed: int, auto_class: type = AutoModel) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "configuration_remote.py").write_text(CONFIGURATION)
    (folder / "modeling_remote.py").write_text(MODELING)
    torch.manual_seed(seed)
    loaded = AutoConfig.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    model = auto_class.from_config(loaded, trust_remote_code=True)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    write_sharded(folder, model.state_dict(), 2)
    return folder

