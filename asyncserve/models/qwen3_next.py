"""Qwen3-Next (Qwen3NextForCausalLM, e.g. Qwen3-Next-80B-A3B): a hybrid decoder. Most layers mix tokens
with Gated DeltaNet (linear attention over a per-sequence recurrent state, layers/gated_delta_net.py);
every `full_attention_interval`-th layer (config.json's `layer_types`) is gated full attention over the
paged KV pool: q/k zero-centred RMSNorm, partial rotary, output scaled by sigmoid of a per-head gate that
q_proj computes beside the queries. Norms scale by (1 + w). The MLP is a sparse MoE with a shared expert
(dense where `mlp_only_layers` says). The multi-token-prediction head (`mtp.*`) is not loaded: it serves
speculative decoding, which asyncserve does not run yet.

Qwen3-Next checkpoints fuse the DeltaNet input projections per key head (q, k, v, z of one key head's
group of value heads side by side; b, a likewise); they are regrouped at load into the [q|k|v|z] and
[b|a] rows that Qwen3.5 checkpoints store as separate tensors (`checkpoint_tensors`).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.gated_delta_net import GatedDeltaNet
from asyncserve.layers.linear import Linear, MergedLinear
from asyncserve.layers.norm import GemmaRMSNorm
from asyncserve.layers.pre_norm_block import PreNormBlock, run_pre_norm_layers
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.rotary import RotaryEmbedding, rope_parameters
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM
from asyncserve.models.llama import LlamaMLP
from asyncserve.models.qwen_moe import QwenSparseMoeBlock, is_sparse_layer

LINEAR_ATTENTION = "linear_attention"


def layer_types(hf_config) -> list[str]:
    """config.json's `layer_types`, or every `full_attention_interval`-th layer full (4 by default)."""
    types = getattr(hf_config, "layer_types", None)
    if types:
        return list(types)
    interval = getattr(hf_config, "full_attention_interval", 4)
    return [LINEAR_ATTENTION if (i + 1) % interval else "full_attention" for i in range(hf_config.num_hidden_layers)]


def rotary_dim(hf_config, head_dim: int) -> int:
    _, scaling = rope_parameters(hf_config)
    factor = scaling.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", None) or 1.0)
    return int(head_dim * factor)


class GatedAttention(nn.Module):
    """Full attention whose output is scaled by sigmoid(gate), the gate computed by q_proj per head."""

    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.num_heads, self.num_kv_heads = hf_config.num_attention_heads, hf_config.num_key_value_heads
        self.head_dim = hf_config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        bias = bool(getattr(hf_config, "attention_bias", False))
        # q_proj's rows hold each head's queries, then its gate: [H, 2 D].
        self.qkv_proj = MergedLinear(hf_config.hidden_size, {"q_proj": 2 * q_size, "k_proj": kv_size,
                                                             "v_proj": kv_size},
                                     bias, quant_config, f"{prefix}.qkv_proj")
        self.sizes = [2 * q_size, kv_size, kv_size]
        self.o_proj = Linear(q_size, hf_config.hidden_size, bias=bias, quant_config=quant_config,
                             prefix=f"{prefix}.o_proj", parallel="row")
        self.q_norm = GemmaRMSNorm(self.head_dim, hf_config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, hf_config.rms_norm_eps)
        theta, scaling = rope_parameters(hf_config)
        # Rotates the first rotary_dim dims of each head (3-D inputs), neox style, as transformers does.
        self.rotary = RotaryEmbedding(rotary_dim(hf_config, self.head_dim), hf_config.max_position_embeddings,
                                      theta, scaling)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q_gate, k, v = self.qkv_proj(hidden).split(self.sizes, dim=-1)
        q, gate = q_gate.view(num_tokens, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [T, H, D] each
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.num_kv_heads, self.head_dim)
        out = self.attn(q, k, v, meta, self.rotary, positions)       # rotates the first rotary_dim: [T, H D]
        return self.o_proj(out * torch.sigmoid(gate.reshape(num_tokens, -1)))


class HybridDecoderLayer(PreNormBlock):
    """Pre-norm block: (Gated DeltaNet | gated attention), then the MLP; norms scale by (1 + w)."""

    def __init__(self, hf_config, layer_type: str, mlp: nn.Module, quant_config: QuantizationConfig | None,
                 prefix: str):
        super().__init__()
        if layer_type == LINEAR_ATTENTION:
            self.linear_attn = GatedDeltaNet(hf_config, quant_config, f"{prefix}.linear_attn")
        else:
            self.self_attn = GatedAttention(hf_config, quant_config, f"{prefix}.self_attn")
        self.is_linear = layer_type == LINEAR_ATTENTION
        self.mlp = mlp
        self.input_layernorm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)

    def mix(self, positions, hidden, meta):
        if self.is_linear:
            return self.linear_attn(hidden, meta)
        return self.self_attn(positions, hidden, meta)


class Qwen3NextForCausalLM(CausalLM):
    """[T] ids -> [T, E] hidden states over a flat batch; DeltaNet layers keep state in the state pool."""

    packed_modules_mapping = {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                              "gate_up_proj": ("gate_proj", "up_proj"),
                              "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
                              "in_proj_ba": ("in_proj_b", "in_proj_a")}
    expert_modules_mapping = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.hf_config = hf_config
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.layers = nn.ModuleList(
            HybridDecoderLayer(hf_config, layer_type, self.make_mlp(hf_config, i, quant_config, f"layers.{i}.mlp"),
                               quant_config, f"layers.{i}")
            for i, layer_type in enumerate(layer_types(hf_config)))
        self.norm = GemmaRMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.build_lm_head(hf_config, quant_config, tied_by_default=False)

    def make_mlp(self, hf_config, layer_index: int, quant_config: QuantizationConfig | None,
                 prefix: str) -> nn.Module:
        if is_sparse_layer(hf_config, layer_index):
            # Qwen3.5-MoE's config has no norm_topk_prob: that family always renormalizes the top-k weights.
            return QwenSparseMoeBlock(hf_config, quant_config, prefix,
                                      renormalize=bool(getattr(hf_config, "norm_topk_prob", True)))
        return LlamaMLP(hf_config, quant_config, prefix)

    @classmethod
    def has_recurrent_state(cls, hf_config) -> bool:
        return LINEAR_ATTENTION in layer_types(hf_config)

    def captures_mixed_steps(self) -> bool:
        return False  # the DeltaNet layers read each step's chunk bounds and state slots

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return run_pre_norm_layers(self.layers, self.norm, self.embed_tokens(input_ids), positions, meta)

    def checkpoint_name(self, name: str) -> str | None:
        if name.startswith("mtp.") or "rotary_emb.inv_freq" in name:  # the MTP head: speculative decoding
            return None
        return super().checkpoint_name(name)

    def checkpoint_tensors(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Qwen3-Next's per-key-head fused DeltaNet projections regrouped into Qwen3.5's separate ones, and
        stacked experts (Qwen3.5-MoE) into one tensor per expert and projection."""
        for name, tensor in weights:
            if name.endswith("linear_attn.in_proj_qkvz.weight"):
                yield from self._split_qkvz(name, tensor)
            elif name.endswith("linear_attn.in_proj_ba.weight"):
                yield from self._split_ba(name, tensor)
            else:
                yield from unstack_experts(name, tensor)

    def _split_qkvz(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        c = self.hf_config
        group = c.linear_num_value_heads // c.linear_num_key_heads
        sizes = [c.linear_key_head_dim, c.linear_key_head_dim, group * c.linear_value_head_dim,
                 group * c.linear_value_head_dim]
        # [Hk, q | k | v-group | z-group, E] -> all heads' q, then k, v, z: rows as the conv's channels
        per_head = tensor.reshape(c.linear_num_key_heads, sum(sizes), -1)
        q, k, v, z = (part.reshape(-1, tensor.shape[-1]) for part in per_head.split(sizes, dim=1))
        prefix = name.removesuffix("in_proj_qkvz.weight")
        yield prefix + "in_proj_qkv.weight", torch.cat([q, k, v])
        yield prefix + "in_proj_z.weight", z

    def _split_ba(self, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        c = self.hf_config
        group = c.linear_num_value_heads // c.linear_num_key_heads
        b, a = tensor.reshape(c.linear_num_key_heads, 2 * group, -1).split(group, dim=1)
        prefix = name.removesuffix("in_proj_ba.weight")
        yield prefix + "in_proj_b.weight", b.reshape(-1, tensor.shape[-1])
        yield prefix + "in_proj_a.weight", a.reshape(-1, tensor.shape[-1])


_STACKED_EXPERTS = re.compile(r"^(.*\.experts)\.(gate_up_proj|down_proj)$")


def unstack_experts(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """'...experts.gate_up_proj' [E, 2I, H] / '...experts.down_proj' [E, H, I] (checkpoints that stack
    the experts, as Qwen3.5-MoE's) -> each expert's gate_proj, up_proj, down_proj weights (views)."""
    match = _STACKED_EXPERTS.match(name)
    if match is None or tensor.dim() != 3:
        yield name, tensor
        return
    experts, projection = match.groups()
    for index, weight in enumerate(tensor):
        if projection == "down_proj":
            yield f"{experts}.{index}.down_proj.weight", weight
        else:
            gate, up = weight.chunk(2, dim=0)
            yield f"{experts}.{index}.gate_proj.weight", gate
            yield f"{experts}.{index}.up_proj.weight", up
