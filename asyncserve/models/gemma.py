"""The Gemma 2 and Gemma 3 (text) family: embeddings scaled by sqrt(hidden), RMSNorm by (1 + w)
around both attention and MLP, a GELU-tanh MLP, local (sliding-window) and global layers;
Gemma 2 soft-caps attention and final logits, Gemma 3 normalises q/k and gives local layers
their own rope base."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.errors import UnsupportedModelError
from asyncserve.layers.activation import GeluTanhAndMul
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import Linear, qkv_linear
from asyncserve.layers.norm import GemmaRMSNorm
from asyncserve.layers.pre_norm_block import norm_in
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.rotary import RotaryEmbedding, rope_parameters
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM
from asyncserve.models.llama import LlamaMLP
from asyncserve.models.sliding_window import layer_sliding_window

# Names transformers gives GELU's tanh approximation.
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
_LAYER_TYPES = ("sliding_attention", "full_attention")


def _rope_of_layer_type(hf_config, layer_type: str) -> tuple[float, dict]:
    """(theta, scaling) of local or global layers: transformers 5 keeps one rope dict per layer
    type (Gemma 3); 4.x configs give the global one plus `rope_local_base_freq`."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type in params:
        scaling = dict(params[layer_type])
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        return float(scaling["rope_theta"]), scaling
    local_base = getattr(hf_config, "rope_local_base_freq", None)
    if layer_type == "sliding_attention" and local_base is not None:
        return float(local_base), {"rope_type": "default"}
    return rope_parameters(hf_config)


class GemmaAttention(nn.Module):
    def __init__(self, hf_config, sliding_window: int | None, rotary: RotaryEmbedding, qk_norm: bool,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.head_dim = hf_config.head_dim
        bias = bool(getattr(hf_config, "attention_bias", False))
        self.qkv_proj = qkv_linear(hf_config.hidden_size, hf_config.num_attention_heads, hf_config.num_key_value_heads,
                                   self.head_dim, bias, quant_config, f"{prefix}.qkv_proj")
        self.o_proj = Linear(hf_config.num_attention_heads * self.head_dim, hf_config.hidden_size, bias=bias,
                             quant_config=quant_config, prefix=f"{prefix}.o_proj", parallel="row")
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.rotary = rotary  # shared by every layer of its type
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=hf_config.query_pre_attn_scalar ** -0.5, sliding_window=sliding_window,
                                   softcap=getattr(hf_config, "attn_logit_softcapping", None))
        self.q_norm = GemmaRMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(self.head_dim, hf_config.rms_norm_eps) if qk_norm else None

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata):
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)                                   # [T, (H + 2 Hkv) D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # Gemma 3 normalises each head before rotary
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.q_size)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.kv_size)
        return self.o_proj(self.attn(q, k, v, meta, self.rotary, positions))  # [T, H D] -> [T, E]


def gemma_mlp(hf_config, quant_config: QuantizationConfig | None, prefix: str) -> LlamaMLP:
    """Llama's gated MLP with GELU's tanh approximation."""
    activation = getattr(hf_config, "hidden_activation", None) or getattr(hf_config, "hidden_act", None)
    if activation not in _GELU_TANH:
        raise UnsupportedModelError(f"Gemma MLP activation {activation!r} is not supported "
                                    f"(one of {', '.join(_GELU_TANH)} is).")
    return LlamaMLP(hf_config, quant_config, prefix, act=GeluTanhAndMul())


class GemmaDecoderLayer(nn.Module):
    """x + post_attn_norm(attn(norm(x))), then the same around the MLP with its own two norms."""

    def __init__(self, hf_config, sliding_window: int | None, rotary: RotaryEmbedding, qk_norm: bool,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.self_attn = GemmaAttention(hf_config, sliding_window, rotary, qk_norm, quant_config,
                                        f"{prefix}.self_attn")
        self.mlp = gemma_mlp(hf_config, quant_config, f"{prefix}.mlp")
        eps = hf_config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hf_config.hidden_size, eps)

    def forward(self, positions, hidden, residual, meta):
        hidden, residual = norm_in(self.input_layernorm, hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2ForCausalLM(CausalLM):
    """[T] ids -> [T, E] hidden states; every `sliding_window_pattern`-th layer is global."""

    qk_norm = False
    sliding_window_pattern = 2  # transformers 4.x Gemma 2: even layers are local
    packed_modules_mapping = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                              "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.hf_config = hf_config
        pattern = getattr(hf_config, "sliding_window_pattern", None) or self.sliding_window_pattern
        windows = [layer_sliding_window(hf_config, i, pattern) for i in range(hf_config.num_hidden_layers)]
        self.rotary = nn.ModuleDict({
            layer_type: RotaryEmbedding(hf_config.head_dim, hf_config.max_position_embeddings,
                                        *_rope_of_layer_type(hf_config, layer_type))
            for layer_type in _LAYER_TYPES})
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        # sqrt(E) in the model's dtype, as transformers rounds it (55.5 for E = 3072 in bf16).
        self.register_buffer("embed_scale", torch.tensor(hf_config.hidden_size ** 0.5), persistent=False)
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(hf_config, window,
                              self.rotary["full_attention" if window is None else "sliding_attention"],
                              self.qk_norm, quant_config, f"layers.{i}")
            for i, window in enumerate(windows))
        self.norm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.final_logit_softcapping = getattr(hf_config, "final_logit_softcapping", None)
        self.build_lm_head(hf_config, quant_config, tied_by_default=True)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        return self.run_layers(self.embed(input_ids), positions, meta)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)                         # [T, E]
        return hidden * self.embed_scale.to(hidden.dtype)

    def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)                       # [S, V]
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model (the 1B checkpoint, model_type gemma3_text): q/k norm, 5 local : 1 global."""

    qk_norm = True
    sliding_window_pattern = 6
