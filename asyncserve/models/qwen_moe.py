"""Qwen MoE: Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B: qkv bias, a shared expert behind a sigmoid gate)
and Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B: q/k norm, no shared expert). Layers listed in `mlp_only_layers`,
or off the `decoder_sparse_step` stride, keep a dense MLP."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.layers.linear import Linear
from asyncserve.layers.moe import FusedMoE
from asyncserve.layers.parallel_state import all_reduce
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.models.llama import LlamaForCausalLM, LlamaMLP


def is_sparse_layer(hf_config, layer_index: int) -> bool:
    """transformers' rule for which decoder layers hold experts."""
    return (layer_index not in (getattr(hf_config, "mlp_only_layers", None) or [])
            and hf_config.num_experts > 0 and (layer_index + 1) % hf_config.decoder_sparse_step == 0)


class QwenSparseMoeBlock(nn.Module):
    """Router `gate` [E, H], `experts`, and (Qwen2-MoE) a dense `shared_expert` every token takes,
    scaled by sigmoid(`shared_expert_gate`). Over several ranks both give partial sums, added up once."""

    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str,
                 renormalize: bool | None = None):
        super().__init__()
        if renormalize is None:  # config.json's, unless the family knows better
            renormalize = bool(getattr(hf_config, "norm_topk_prob", False))
        shared_size = getattr(hf_config, "shared_expert_intermediate_size", 0) or 0
        self.gate = Linear(hf_config.hidden_size, hf_config.num_experts, prefix=f"{prefix}.gate")  # never quantized
        self.experts = FusedMoE(hf_config.num_experts, hf_config.num_experts_per_tok, hf_config.hidden_size,
                                hf_config.moe_intermediate_size,
                                renormalize=renormalize,
                                quant_config=quant_config, prefix=f"{prefix}.experts",
                                reduce_results=not shared_size)
        self.shared_expert = (LlamaMLP(hf_config, quant_config, f"{prefix}.shared_expert", shared_size,
                                       reduce_results=False) if shared_size else None)
        self.shared_expert_gate = (Linear(hf_config.hidden_size, 1, prefix=f"{prefix}.shared_expert_gate")
                                   if shared_size else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.experts(hidden, self.gate(hidden))                 # [T, E] logits -> [T, H]
        if self.shared_expert is not None:
            out = all_reduce(out + torch.sigmoid(self.shared_expert_gate(hidden)) * self.shared_expert(hidden))
        return out


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    expert_modules_mapping = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    @property
    def qkv_bias(self) -> bool:  # Qwen1.5-MoE's config.json predates the field: biases by default
        return bool(getattr(self.hf_config, "qkv_bias", True))

    def make_mlp(self, hf_config, layer_index, quant_config, prefix):
        return QwenSparseMoeBlock(hf_config, quant_config, prefix) if is_sparse_layer(hf_config, layer_index) else None


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    qkv_bias = False  # attention_bias, read by the attention, covers q, k, v and o
    qk_norm = True
