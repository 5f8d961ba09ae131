"""Mixtral: Mistral's attention with a sparse MoE feed-forward (top-2 of 8 experts, weights always
renormalized over the chosen experts)."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.layers.linear import Linear
from asyncserve.layers.moe import FusedMoE
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.models.llama import LlamaForCausalLM


class MixtralMoE(nn.Module):
    """The checkpoint's `block_sparse_moe`: a router `gate` [E, H] and experts w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        num_experts = hf_config.num_local_experts
        self.gate = Linear(hf_config.hidden_size, num_experts, prefix=f"{prefix}.gate")  # router: never quantized
        self.experts = FusedMoE(num_experts, hf_config.num_experts_per_tok, hf_config.hidden_size,
                                hf_config.intermediate_size, renormalize=True, quant_config=quant_config,
                                prefix=f"{prefix}.experts")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, self.gate(hidden))                # [T, E] logits -> [T, H]


class MixtralForCausalLM(LlamaForCausalLM):
    expert_modules_mapping = {"w1": "gate", "w3": "up", "w2": "down"}

    def make_mlp(self, hf_config, layer_index, quant_config, prefix):
        return MixtralMoE(hf_config, quant_config, prefix)

    def checkpoint_name(self, name: str) -> str | None:
        name = super().checkpoint_name(name)
        return name.replace(".block_sparse_moe.", ".mlp.") if name is not None else None
