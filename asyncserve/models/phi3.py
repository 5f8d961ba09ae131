"""Microsoft's Phi-3 / Phi-3.5 / Phi-4-mini (Phi3ForCausalLM): a Llama-shaped decoder whose checkpoints
fuse qkv_proj and gate_up_proj into one tensor each, with LongRoPE for the 128k-context variants and
partial rotary for Phi-4-mini."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.errors import UnsupportedModelError
from asyncserve.layers.activation import SiluAndMul
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import Linear, MergedLinear, qkv_linear
from asyncserve.layers.longrope import PhiRotaryEmbedding
from asyncserve.layers.norm import RMSNorm
from asyncserve.layers.pre_norm_block import norm_in
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.rotary import rope_parameters
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM
from asyncserve.models.sliding_window import layer_sliding_window


def _rotary(hf_config, head_dim: int) -> PhiRotaryEmbedding:
    theta, scaling = rope_parameters(hf_config)
    rotary_dim = int(head_dim * scaling.get("partial_rotary_factor",
                                            getattr(hf_config, "partial_rotary_factor", None) or 1.0))
    return PhiRotaryEmbedding(head_dim, rotary_dim, hf_config.max_position_embeddings, theta, scaling,
                              getattr(hf_config, "original_max_position_embeddings", None))


class Phi3Attention(nn.Module):
    def __init__(self, hf_config, head_dim: int, quant_config: QuantizationConfig | None, prefix: str,
                 layer_index: int):
        super().__init__()
        heads = hf_config.num_attention_heads
        kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
        # The checkpoint's qkv_proj is already one [q + k + v, E] tensor, cut into its shards per rank.
        self.qkv_proj = qkv_linear(hf_config.hidden_size, heads, kv_heads, head_dim, False, quant_config,
                                   f"{prefix}.qkv_proj", fused_in_checkpoint=True)
        self.o_proj = Linear(heads * head_dim, hf_config.hidden_size, quant_config=quant_config,
                             prefix=f"{prefix}.o_proj", parallel="row")
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        # Phi-3-mini's configs set sliding_window (2047): transformers masks by it, so do the kernels.
        self.attn = PagedAttention(heads, kv_heads, head_dim, scale=head_dim ** -0.5,
                                   sliding_window=layer_sliding_window(hf_config, layer_index))

    def forward(self, rotary: PhiRotaryEmbedding, rows: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        return self.o_proj(self.attn(q, k, v, meta, rotary, rows))    # q, k rotated at their cache rows


class Phi3MLP(nn.Module):
    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        size = hf_config.intermediate_size
        # [gate | up] rows, one tensor in the checkpoint.
        self.gate_up_proj = MergedLinear(hf_config.hidden_size, {"gate_proj": size, "up_proj": size},
                                         quant_config=quant_config, prefix=f"{prefix}.gate_up_proj",
                                         fused_in_checkpoint=True)
        self.act = SiluAndMul()
        self.down_proj = Linear(size, hf_config.hidden_size, quant_config=quant_config, prefix=f"{prefix}.down_proj",
                                parallel="row")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))  # [T, 2I] -> [T, I] -> [T, E]


class Phi3DecoderLayer(nn.Module):
    def __init__(self, hf_config, head_dim: int, quant_config: QuantizationConfig | None, prefix: str,
                 layer_index: int):
        super().__init__()
        self.self_attn = Phi3Attention(hf_config, head_dim, quant_config, f"{prefix}.self_attn", layer_index)
        self.mlp = Phi3MLP(hf_config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def forward(self, rotary, rows, hidden, residual, meta):
        hidden, residual = norm_in(self.input_layernorm, hidden, residual)
        hidden = self.self_attn(rotary, rows, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class Phi3ForCausalLM(CausalLM):
    """[T] ids -> [T, E] hidden states."""

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        if getattr(hf_config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"Phi-3 with hidden_act {hf_config.hidden_act!r} is not supported (silu is).")
        self.hf_config = hf_config
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.rotary = _rotary(hf_config, head_dim)   # one cos|sin table for every layer
        self.layers = nn.ModuleList(Phi3DecoderLayer(hf_config, head_dim, quant_config, f"layers.{i}", i)
                                    for i in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.build_lm_head(hf_config, quant_config, tied_by_default=False)

    def captures_mixed_steps(self) -> bool:
        """LongRoPE picks each token's table by its sequence's length (the step's metadata)."""
        return self.rotary.original_max_position is None

    @classmethod
    def kv_recompute_length(cls, hf_config, max_model_len: int) -> int | None:
        """LongRoPE rotates with one factor set up to `original_max_position_embeddings` tokens and another
        past it; transformers recomputes a sequence's whole KV when it grows past that length."""
        scaling = {**(getattr(hf_config, "rope_scaling", None) or {}),
                   **(getattr(hf_config, "rope_parameters", None) or {})}
        if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
            return None
        original = (getattr(hf_config, "original_max_position_embeddings", None)
                    or scaling.get("original_max_position_embeddings"))
        return original if original and original < max_model_len else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        rows = self.rotary.cache_rows(positions, meta)
        hidden = self.embed_tokens(input_ids)                         # [T, E]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(self.rotary, rows, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def checkpoint_name(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name:  # recomputed, never loaded
            return None
        return super().checkpoint_name(name)
