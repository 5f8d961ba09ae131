"""OpenAI's GPT-2 (gpt2 ... gpt2-xl, and its fine-tunes): learned positions, pre-LN blocks with biased
LayerNorm, Conv1D projections (weights stored [in, out], transposed at load) with a fused c_attn, and
GELU (tanh) in the MLP."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.errors import UnsupportedModelError
from asyncserve.layers.activation import get_activation
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.layer_norm import LayerNorm
from asyncserve.layers.linear import Linear, qkv_linear
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM


class GPT2Attention(nn.Module):
    def __init__(self, hf_config, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        hidden, heads = hf_config.hidden_size, hf_config.num_attention_heads
        head_dim = hidden // heads
        scale = head_dim ** -0.5 if getattr(hf_config, "scale_attn_weights", True) else 1.0
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
            scale /= float(layer_idx + 1)
        # reorder_and_upcast_attn only changes transformers' fp16 arithmetic: our attention keeps scores in fp32.
        # c_attn is one [E, 3E] tensor (q | k | v columns): split per rank as three shards.
        self.c_attn = qkv_linear(hidden, heads, heads, head_dim, True, quant_config, f"{prefix}.c_attn",
                                 ("q", "k", "v"), fused_in_checkpoint=True, checkpoint_transposed=True)
        self.c_proj = Linear(hidden, hidden, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_proj",
                             parallel="row", checkpoint_transposed=True)
        heads = self.c_attn.num_heads  # this rank's
        self.attn = PagedAttention(heads, heads, head_dim, scale=scale)

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.c_attn(hidden).chunk(3, dim=-1)             # [T, 3 H D] -> 3 x [T, H D]
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        inner = getattr(hf_config, "n_inner", None) or 4 * hf_config.hidden_size
        self.c_fc = Linear(hf_config.hidden_size, inner, bias=True, quant_config=quant_config, prefix=f"{prefix}.c_fc",
                           parallel="column", checkpoint_transposed=True)
        self.act = get_activation(hf_config.activation_function)
        self.c_proj = Linear(inner, hf_config.hidden_size, bias=True, quant_config=quant_config,
                             prefix=f"{prefix}.c_proj", parallel="row", checkpoint_transposed=True)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(hidden)))


class GPT2Block(nn.Module):
    def __init__(self, hf_config, layer_idx: int, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        eps = hf_config.layer_norm_epsilon
        self.ln_1 = LayerNorm(hf_config.hidden_size, eps)
        self.attn = GPT2Attention(hf_config, layer_idx, quant_config, f"{prefix}.attn")
        self.ln_2 = LayerNorm(hf_config.hidden_size, eps)
        self.mlp = GPT2MLP(hf_config, quant_config, f"{prefix}.mlp")

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        hidden = hidden + self.attn(self.ln_1(hidden), meta)
        return hidden + self.mlp(self.ln_2(hidden))


class GPT2LMHeadModel(CausalLM):
    """[T] ids -> [T, E] hidden states; the LM head is the token embedding."""

    checkpoint_prefix = "transformer."

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        if getattr(hf_config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention (add_cross_attention) is an encoder-decoder "
                                        "part, not a causal LM asyncserve serves.")
        self.hf_config = hf_config
        self.wte = self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.wpe = nn.Embedding(hf_config.max_position_embeddings, hf_config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(hf_config, i, quant_config, f"h.{i}")
                               for i in range(hf_config.num_hidden_layers))
        self.ln_f = LayerNorm(hf_config.hidden_size, hf_config.layer_norm_epsilon)
        self.build_lm_head(hf_config, quant_config, tied_by_default=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        hidden = self.wte(input_ids) + self.wpe(positions)           # [T, E]
        for block in self.h:
            hidden = block(hidden, meta)
        return self.ln_f(hidden)

    def checkpoint_name(self, name: str) -> str | None:
        # Older checkpoints keep the causal-mask buffers (attn.bias, attn.masked_bias): not weights.
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            return None
        # openai-community/gpt2 names the body without the "transformer." prefix.
        if not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name
        return super().checkpoint_name(name)
