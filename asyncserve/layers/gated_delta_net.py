"""Gated DeltaNet (Qwen3-Next, Qwen3.5): the linear-attention token mixer of hybrid models.

    hidden -> in_proj_qkvz -> q|k|v (short causal conv, SiLU) and z (output gate)
           -> in_proj_ba   -> beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias)
    gated delta rule over each sequence's state -> RMSNorm(o) * silu(z) -> out_proj

Each sequence's conv state [conv_dim, W] and delta-rule state [Hv, Dk, Dv] live in the runner's state pool
at the slot the step's metadata gives (`meta.state_slots`): a step reads them, continues the sequence from
there (a decode token, or a prompt chunk that may end mid-way through a kernel chunk) and writes them back.
A decode step gathers and scatters by slot on the device, with no host sync, so it is CUDA-graph
capturable; a step with prompt chunks runs eagerly (the varlen kernels read the chunk bounds).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncserve.errors import ConfigError
from asyncserve.kernels.causal_conv1d import causal_conv1d_update, causal_conv1d_varlen
from asyncserve.kernels.gated_delta_rule import (
    chunk_gated_delta_rule_varlen,
    recurrent_gated_delta_rule_step,
)
from asyncserve.layers.attention import AttentionMetadata
from asyncserve.layers.linear import Linear, MergedLinear
from asyncserve.layers.parallel_state import tp_size
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.recurrent_state import RecurrentStateLayer


def _varlen_offsets(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's sequence offsets for the varlen kernels: the runner's int64 pair made once per step where
    it made one, else query_start_loc as it is (the memory profile's forward, tests building metadata)."""
    if meta.state_query_start_loc is not None:
        return meta.state_query_start_loc, meta.state_query_start_loc_host
    return meta.query_start_loc, None


class RMSNormGated(nn.Module):
    """weight * RMSNorm(x) * silu(z), per value head (the norm is not zero-centred: weight starts at 1)."""

    is_norm = True  # random (dummy) weights leave it as built

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        normed = (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return (self.weight * normed * F.silu(z.float())).to(x.dtype)


class _Conv1dWeight(nn.Module):
    """Holds the depthwise kernel under the checkpoint's name (`conv1d.weight`, [conv_dim, 1, W])."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, width))


class GatedDeltaNet(RecurrentStateLayer):
    """hidden [T, E] -> [T, E]; reads and writes each sequence's state at its slot."""

    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        if tp_size() > 1:
            raise ConfigError(f"{prefix}: Gated DeltaNet layers are not tensor-parallel yet: serve hybrid models "
                              "(Qwen3-Next, Qwen3.5) with tensor_parallel_size 1")
        hidden = hf_config.hidden_size
        self.num_k_heads, self.num_v_heads = hf_config.linear_num_key_heads, hf_config.linear_num_value_heads
        self.k_dim, self.v_dim = hf_config.linear_key_head_dim, hf_config.linear_value_head_dim
        if self.num_v_heads % self.num_k_heads:
            raise ConfigError(f"{prefix}: linear_num_value_heads ({self.num_v_heads}) must be a multiple of "
                              f"linear_num_key_heads ({self.num_k_heads})")
        self.key_size, self.value_size = self.num_k_heads * self.k_dim, self.num_v_heads * self.v_dim
        self.conv_dim = 2 * self.key_size + self.value_size
        self.conv_width = hf_config.linear_conv_kernel_dim
        # q|k|v (the conv's channels) and z in one matmul; b and a (per value head) in another.
        self.in_proj_qkvz = MergedLinear(hidden, {"in_proj_qkv": self.conv_dim, "in_proj_z": self.value_size},
                                         quant_config=quant_config, prefix=f"{prefix}.in_proj_qkvz")
        self.in_proj_ba = MergedLinear(hidden, {"in_proj_b": self.num_v_heads, "in_proj_a": self.num_v_heads},
                                       prefix=f"{prefix}.in_proj_ba")
        self.conv1d = _Conv1dWeight(self.conv_dim, self.conv_width)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads))
        self.norm = RMSNormGated(self.v_dim, hf_config.rms_norm_eps)
        self.out_proj = Linear(self.value_size, hidden, quant_config=quant_config, prefix=f"{prefix}.out_proj",
                               parallel="row")

    def state_shapes(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """The conv state (its last W inputs, in the model's dtype) and the delta-rule state (in
        `ssm_state_dtype`; the kernels compute in fp32 whatever it is stored in)."""
        return [((self.conv_dim, self.conv_width), self.conv1d.weight.dtype),
                ((self.num_v_heads, self.k_dim, self.v_dim), self.ssm_state_dtype)]

    def forward(self, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv, z = self.in_proj_qkvz(hidden).split([self.conv_dim, self.value_size], dim=-1)
        b, a = self.in_proj_ba(hidden).split(self.num_v_heads, dim=-1)
        beta = b.sigmoid()                                                    # [T, Hv]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)  # [T, Hv] log decay, fp32
        conv_states, rule_states = self.state_cache
        slots = meta.state_slots
        weight = self.conv1d.weight[:, 0]                                     # [conv_dim, W]
        if meta.is_decode:  # one token per sequence
            qkv, conv_state = causal_conv1d_update(qkv, weight, conv_states[slots])
        else:
            starts, starts_host = _varlen_offsets(meta)
            qkv, conv_state = causal_conv1d_varlen(qkv, weight, conv_states[slots], starts, starts_host)
        conv_states.index_copy_(0, slots, conv_state.to(conv_states.dtype))
        q, k, v = qkv.split([self.key_size, self.key_size, self.value_size], dim=-1)
        q = q.reshape(num_tokens, self.num_k_heads, self.k_dim)
        k = k.reshape(num_tokens, self.num_k_heads, self.k_dim)
        v = v.reshape(num_tokens, self.num_v_heads, self.v_dim)
        if meta.is_decode:
            out, rule_state = recurrent_gated_delta_rule_step(q, k, v, g, beta, rule_states[slots])
        else:
            out, rule_state = chunk_gated_delta_rule_varlen(q, k, v, g, beta, rule_states[slots], starts,
                                                            starts_host)
        rule_states.index_copy_(0, slots, rule_state.to(rule_states.dtype))
        out = self.norm(out.reshape(-1, self.v_dim), z.reshape(-1, self.v_dim))  # [T Hv, Dv]
        return self.out_proj(out.reshape(num_tokens, self.value_size))
