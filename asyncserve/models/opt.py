"""Meta's OPT (facebook/opt-125m ... opt-66b): learned positions offset by 2, LayerNorm with bias, ReLU
MLP, pre-LN or post-LN blocks (`do_layer_norm_before`), and opt-350m's project_in/out between a narrower
word embedding and the decoder."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.layers.activation import get_activation
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.layer_norm import LayerNorm
from asyncserve.layers.linear import Linear, qkv_linear
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM

POSITION_OFFSET = 2  # OPT's position table keeps two rows before position 0


class OPTAttention(nn.Module):
    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = hidden // heads
        bias = getattr(hf_config, "enable_bias", True)
        self.qkv_proj = qkv_linear(hidden, heads, heads, head_dim, bias, quant_config, f"{prefix}.qkv_proj")
        self.out_proj = Linear(hidden, hidden, bias=bias, quant_config=quant_config, prefix=f"{prefix}.out_proj",
                               parallel="row")
        heads = self.qkv_proj.num_heads  # this rank's
        self.attn = PagedAttention(heads, heads, head_dim, scale=head_dim ** -0.5)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).chunk(3, dim=-1)           # [T, 3 H D] -> 3 x [T, H D]
        return self.out_proj(self.attn(q, k, v, meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        hidden = hf_config.hidden_size
        bias = getattr(hf_config, "enable_bias", True)
        affine = getattr(hf_config, "layer_norm_elementwise_affine", True)
        self.pre_norm = hf_config.do_layer_norm_before
        self.self_attn = OPTAttention(hf_config, quant_config, f"{prefix}.self_attn")
        self.self_attn_layer_norm = LayerNorm(hidden, affine=affine)
        self.fc1 = Linear(hidden, hf_config.ffn_dim, bias=bias, quant_config=quant_config, prefix=f"{prefix}.fc1",
                          parallel="column")
        self.act = get_activation(hf_config.activation_function)
        self.fc2 = Linear(hf_config.ffn_dim, hidden, bias=bias, quant_config=quant_config, prefix=f"{prefix}.fc2",
                          parallel="row")
        self.final_layer_norm = LayerNorm(hidden, affine=affine)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # Pre-LN (125m, 1.3b, ...) normalises each sublayer's input; post-LN (350m) its output.
        residual = hidden
        if self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        hidden = residual + self.self_attn(hidden, meta)
        if not self.pre_norm:
            hidden = self.self_attn_layer_norm(hidden)
        residual = hidden
        if self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        hidden = residual + self.fc2(self.act(self.fc1(hidden)))
        if not self.pre_norm:
            hidden = self.final_layer_norm(hidden)
        return hidden


class OPTForCausalLM(CausalLM):
    """[T] ids -> [T, word_embed_proj_dim] hidden states (the LM head's width)."""

    packed_modules_mapping = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    checkpoint_prefix = "model.decoder."

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.hf_config = hf_config
        hidden = hf_config.hidden_size
        embed_dim = getattr(hf_config, "word_embed_proj_dim", None) or hidden
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, embed_dim)
        self.embed_positions = nn.Embedding(hf_config.max_position_embeddings + POSITION_OFFSET, hidden)
        # Linear without a quant_config: quantized OPT checkpoints keep these two in full precision.
        self.project_in = Linear(embed_dim, hidden) if embed_dim != hidden else None
        self.project_out = Linear(hidden, embed_dim) if embed_dim != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(hf_config, quant_config, f"layers.{i}")
                                    for i in range(hf_config.num_hidden_layers))
        final_norm = hf_config.do_layer_norm_before and not getattr(hf_config, "_remove_final_layer_norm", False)
        self.final_layer_norm = (LayerNorm(hidden, affine=getattr(hf_config, "layer_norm_elementwise_affine", True))
                                 if final_norm else None)
        self.build_lm_head(hf_config, quant_config, tied_by_default=True, hidden_size=embed_dim)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        hidden = self.embed_tokens(input_ids)                         # [T, word_embed_proj_dim]
        if self.project_in is not None:
            hidden = self.project_in(hidden)                          # [T, E]
        hidden = hidden + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            hidden = layer(hidden, meta)
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return hidden

    def checkpoint_name(self, name: str) -> str | None:
        # facebook/opt-* checkpoints name the body "decoder.*", transformers' save_pretrained "model.decoder.*".
        if name.startswith("decoder."):
            name = "model." + name
        return super().checkpoint_name(name)
