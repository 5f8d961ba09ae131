"""GPT-OSS (openai/gpt-oss-20b and -120b): pre-norm decoder layers that alternate sliding-window (128
tokens) and full attention (`layer_types`), with biases on q/k/v/o, a learned sink logit per query head,
YaRN rotary, and a mixture of experts in every layer: a router with a bias (top-k of its logits, softmax
over them), experts with biases and a clamped SwiGLU (alpha 1.702, limit 7.0).

Checkpoints: the public one keeps its experts in MXFP4 (`experts.gate_up_proj_blocks` / `_scales`,
`down_proj_blocks` / `_scales`); transformers saves them dequantized (`experts.gate_up_proj` [E, H, 2I],
`down_proj` [E, I, H]). Either way gate and up are interleaved (even columns the gate). Both load here:
the experts are split into per-expert gate / up / down tensors (dequantized to the model's dtype first,
see kernels/mxfp4.py for why) and land in the fused MoE layer like any MoE family's.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels.mxfp4 import dequantize_mxfp4
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import Linear, qkv_linear
from asyncserve.layers.moe import FusedMoE
from asyncserve.layers.norm import RMSNorm
from asyncserve.layers.pre_norm_block import PreNormBlock, run_pre_norm_layers
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.quantization.mxfp4 import Mxfp4Config
from asyncserve.layers.rotary import RotaryEmbedding, rope_parameters
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM
from asyncserve.models.sliding_window import layer_sliding_window

# '<prefix>.mlp.experts.gate_up_proj_blocks' -> ('<prefix>.mlp.experts', 'gate_up_proj', '_blocks')
_FUSED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)(_blocks|_scales|_bias)?$")


# The clamped SwiGLU's sigmoid slope: fixed in the published model (newer transformers configs carry it
# as `swiglu_alpha`, older ones, like the GPU machine's 5.17, do not).
SWIGLU_ALPHA = 1.702


class GptOssAttention(nn.Module):
    def __init__(self, hf_config, layer_index: int, rotary: RotaryEmbedding,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.head_dim = hf_config.head_dim
        bias = bool(getattr(hf_config, "attention_bias", True))
        self.qkv_proj = qkv_linear(hf_config.hidden_size, hf_config.num_attention_heads,
                                   hf_config.num_key_value_heads, self.head_dim, bias, quant_config,
                                   f"{prefix}.qkv_proj")
        self.o_proj = Linear(hf_config.num_attention_heads * self.head_dim, hf_config.hidden_size, bias=bias,
                             quant_config=quant_config, prefix=f"{prefix}.o_proj", parallel="row")
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.rotary = rotary  # one table for every layer
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                                   sliding_window=layer_sliding_window(hf_config, layer_index), sinks=True)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(q, k, v, meta, self.rotary, positions))  # [T, H D] -> [T, E]


class GptOssMoE(nn.Module):
    """`router` [E, H] with a bias, then the experts. Softmax over the top-k logits equals the full
    softmax's top-k renormalized, which is what the fused kernel computes."""

    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        num_experts = hf_config.num_local_experts
        self.router = Linear(hf_config.hidden_size, num_experts, bias=True, prefix=f"{prefix}.router")  # never quantized
        # MXFP4 experts arrive dequantized (checkpoint_tensors); other methods' experts (with GPT-OSS's
        # biases and fused gate_up checkpoint tensors) are not served.
        if quant_config is not None and quant_config.name is not None and not isinstance(quant_config, Mxfp4Config):
            raise ConfigError(f"{prefix}: quantized MoE experts ({quant_config.name}) are not supported for "
                              "GPT-OSS (only its MXFP4 checkpoints, served dequantized); serve the published "
                              "checkpoint without --quantization")
        experts_quant = None
        self.experts = FusedMoE(num_experts, hf_config.num_experts_per_tok, hf_config.hidden_size,
                                hf_config.intermediate_size, renormalize=True, quant_config=experts_quant,
                                prefix=f"{prefix}.experts", has_bias=True, activation="swigluoai",
                                swiglu_alpha=getattr(hf_config, "swiglu_alpha", SWIGLU_ALPHA),
                                swiglu_limit=hf_config.swiglu_limit)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.router(hidden))             # [T, E] logits -> [T, H]


class GptOssDecoderLayer(PreNormBlock):
    def __init__(self, hf_config, layer_index: int, rotary: RotaryEmbedding,
                 quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.self_attn = GptOssAttention(hf_config, layer_index, rotary, quant_config, f"{prefix}.self_attn")
        self.mlp = GptOssMoE(hf_config, quant_config, f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)


class GptOssForCausalLM(CausalLM):
    """[T] ids -> [T, E] hidden states."""

    packed_modules_mapping = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}
    # The per-expert names checkpoint_tensors gives the fused experts' slices.
    expert_modules_mapping = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.hf_config = hf_config
        theta, scaling = rope_parameters(hf_config)
        self.rotary = RotaryEmbedding(hf_config.head_dim, hf_config.max_position_embeddings, theta, scaling)
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            GptOssDecoderLayer(hf_config, i, self.rotary, quant_config, f"layers.{i}")
            for i in range(hf_config.num_hidden_layers))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.build_lm_head(hf_config, quant_config, tied_by_default=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        return run_pre_norm_layers(self.layers, self.norm, self.embed_tokens(input_ids), positions, meta)

    def checkpoint_name(self, name: str) -> str | None:
        name = super().checkpoint_name(name)
        if name is not None and name.endswith(".self_attn.sinks"):
            return name.removesuffix(".sinks") + ".attn.sinks"
        return name

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each layer's fused experts (MXFP4 blocks and scales, or transformers' dequantized layout, and
        their biases) as per-expert '<experts>.<e>.{gate,up,down}_proj.{weight,bias}' tensors."""
        reference = self.embed_tokens.weight
        packed: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 halves waiting for their other half
        for name, tensor in weights:
            match = _FUSED_EXPERTS.match(name)
            if match is None:
                yield name, tensor
                continue
            experts, projection, suffix = match.groups()
            if suffix == "_bias":
                yield from _per_expert(experts, projection, "bias", tensor)
            elif suffix is None:  # transformers' layout: [E, in, out]
                yield from _per_expert(experts, projection, "weight", tensor.transpose(1, 2))
            else:
                halves = packed.setdefault(f"{experts}.{projection}", {})
                halves[suffix] = tensor
                if len(halves) == 2:
                    del packed[f"{experts}.{projection}"]
                    weight = dequantize_mxfp4(halves["_blocks"].to(reference.device),
                                              halves["_scales"].to(reference.device), reference.dtype)
                    yield from _per_expert(experts, projection, "weight", weight)  # [E, out, in]
        if packed:
            unpaired = sorted(f"{name}{next(iter(halves))}" for name, halves in packed.items())
            raise ConfigError(f"MXFP4 experts without their other half (blocks need scales): {', '.join(unpaired)}")


def _per_expert(experts: str, projection: str, kind: str,
                tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """tensor [E, out, ...] of one fused projection -> each expert's gate and up (the even and odd rows
    of gate_up_proj) or down, named as a per-expert checkpoint would name them."""
    for expert in range(tensor.shape[0]):
        if projection == "gate_up_proj":
            yield f"{experts}.{expert}.gate_proj.{kind}", tensor[expert, 0::2]
            yield f"{experts}.{expert}.up_proj.{kind}", tensor[expert, 1::2]
        else:
            yield f"{experts}.{expert}.down_proj.{kind}", tensor[expert]
