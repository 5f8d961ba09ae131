"""The Llama family: Llama 2/3, Mistral (sliding window), Qwen2/2.5 (qkv bias), Qwen3 (q/k norm)."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.layers.activation import SiluAndMul
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import Linear, MergedLinear, qkv_linear
from asyncserve.layers.norm import RMSNorm
from asyncserve.layers.pre_norm_block import PreNormBlock, run_pre_norm_layers
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.rotary import RotaryEmbedding, rope_parameters
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM
from asyncserve.models.sliding_window import layer_sliding_window


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


class LlamaAttention(nn.Module):
    def __init__(self, hf_config, qkv_bias: bool, qk_norm: bool, quant_config: QuantizationConfig | None,
                 prefix: str, layer_index: int = 0):
        super().__init__()
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        self.head_dim = _head_dim(hf_config)
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        self.qkv_proj = qkv_linear(hf_config.hidden_size, num_heads, num_kv_heads, self.head_dim,
                                   qkv_bias or attention_bias, quant_config, f"{prefix}.qkv_proj")
        self.o_proj = Linear(num_heads * self.head_dim, hf_config.hidden_size, bias=attention_bias,
                             quant_config=quant_config, prefix=f"{prefix}.o_proj", parallel="row")
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        theta, scaling = rope_parameters(hf_config)
        self.rotary = RotaryEmbedding(self.head_dim, hf_config.max_position_embeddings, theta, scaling)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=self.head_dim ** -0.5,
                                   sliding_window=layer_sliding_window(hf_config, layer_index))
        self.q_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata):
        return self.attend(positions, self.qkv_proj(hidden), meta)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata):
        """The layer past its qkv projection ([T, (H + 2 Hkv) D], which PreNormBlock may fuse with its norm)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # Qwen3 normalises each head before rotary: the attention does it, with the rotary where it can
        head_norms = (self.q_norm, self.k_norm) if self.q_norm is not None else None
        out = self.attn(q, k, v, meta, self.rotary, positions, head_norms)  # rotates q, k: [T, H D]
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    """down(act(gate, up)) over one fused gate|up projection; `act` SiLU-and-mul unless a family says."""

    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str,
                 intermediate_size: int | None = None, act: nn.Module | None = None, reduce_results: bool = True):
        super().__init__()
        size = intermediate_size or hf_config.intermediate_size
        bias = getattr(hf_config, "mlp_bias", False)
        self.act = act if act is not None else SiluAndMul()
        self.gate_up_proj = MergedLinear(hf_config.hidden_size, {"gate_proj": size, "up_proj": size}, bias=bias,
                                         quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = Linear(size, hf_config.hidden_size, bias=bias, quant_config=quant_config,
                                prefix=f"{prefix}.down_proj", parallel="row", reduce_results=reduce_results)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.from_gate_up(self.gate_up_proj(hidden))

    def from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[T, 2I] -> [T, I] -> [T, E]; one row may run the activation inside the down projection's GEMV."""
        return self.down_proj.forward_activated(self.act, gate_up)

    def tune_single_row_fusions(self, timings: dict) -> list[str]:
        activation = getattr(self.act, "gemv_activation", None)
        tune = getattr(self.down_proj.quant_method, "tune_gated_row", None)
        line = tune(self.down_proj, activation, timings) if activation and tune else None
        return [line] if line else []


class LlamaDecoderLayer(PreNormBlock):
    def __init__(self, hf_config, qkv_bias: bool, qk_norm: bool, quant_config: QuantizationConfig | None,
                 prefix: str, mlp: nn.Module | None = None, layer_index: int = 0):
        super().__init__()
        self.self_attn = LlamaAttention(hf_config, qkv_bias, qk_norm, quant_config, f"{prefix}.self_attn",
                                        layer_index)
        self.mlp = mlp if mlp is not None else LlamaMLP(hf_config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)


class LlamaForCausalLM(CausalLM):
    """Decoder-only transformer over a flattened token batch: [T] ids -> [T, E] hidden states."""

    qkv_bias = False
    qk_norm = False
    # The decoder bodies alone, as sentence-transformers saves embedding checkpoints: served as embedding
    # models (pooling_config.py), their LM head dropped.
    other_architectures = ("LlamaModel",)
    packed_modules_mapping = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                              "gate_up_proj": ("gate_proj", "up_proj")}
    supports_aux_hidden_states = True

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.hf_config = hf_config
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(hf_config, self.qkv_bias, self.qk_norm, quant_config, f"layers.{i}",
                              self.make_mlp(hf_config, i, quant_config, f"layers.{i}.mlp"), layer_index=i)
            for i in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.build_lm_head(hf_config, quant_config, tied_by_default=False)

    def make_mlp(self, hf_config, layer_index: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module | None:
        """Layer `layer_index`'s feed-forward block; None: the dense SwiGLU MLP (MoE families override)."""
        return None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        if self.aux_hidden_sink is None:
            return run_pre_norm_layers(self.layers, self.norm, self.embed_tokens(input_ids), positions, meta)
        hidden, aux = run_pre_norm_layers(self.layers, self.norm, self.embed_tokens(input_ids), positions, meta,
                                          self.aux_hidden_layer_ids)
        self.aux_hidden_sink(aux, meta)  # EAGLE-3: [T, E] per requested layer
        return hidden

    def checkpoint_name(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name:  # recomputed, never loaded
            return None
        return super().checkpoint_name(name)


class MistralForCausalLM(LlamaForCausalLM):
    other_architectures = ("MistralModel",)


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    other_architectures = ("Qwen2Model",)


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
    other_architectures = ("Qwen3Model",)
