"""Qwen-1 (QWenLMHeadModel: Qwen-7B/14B(-Chat)), whose checkpoints ship their modeling code as remote
code: the same pre-norm RMSNorm / rotary / SwiGLU decoder as Llama, written natively here.

Checkpoint names: transformer.wte, transformer.h.N.{ln_1, attn.c_attn (fused q|k|v with bias), attn.c_proj,
ln_2, mlp.w1, mlp.w2, mlp.c_proj}, transformer.ln_f, lm_head. In modeling_qwen.py the MLP is
c_proj(w1(x) * silu(w2(x))): w2 is the gate, w1 the up projection, and `intermediate_size` is twice the
MLP width. The hf_config is asyncserve's own reading of config.json (asyncserve/checkpoints/qwen_config.py).
"""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.layers.activation import SiluAndMul
from asyncserve.layers.attention import AttentionMetadata, PagedAttention
from asyncserve.layers.linear import Linear, MergedLinear, qkv_linear
from asyncserve.layers.norm import RMSNorm
from asyncserve.layers.pre_norm_block import norm_in
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.rotary import RotaryEmbedding
from asyncserve.layers.vocab_parallel import VocabParallelEmbedding
from asyncserve.models.base import CausalLM


class QWenAttention(nn.Module):
    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.head_dim = hf_config.kv_channels
        heads = hf_config.num_attention_heads
        # c_attn is one [3 H D, E] tensor (q | k | v rows): cut into its shards per rank.
        self.c_attn = qkv_linear(hf_config.hidden_size, heads, heads, self.head_dim, True, quant_config,
                                 f"{prefix}.c_attn", ("q", "k", "v"), fused_in_checkpoint=True)
        self.c_proj = Linear(heads * self.head_dim, hf_config.hidden_size, bias=not hf_config.no_bias,
                             quant_config=quant_config, prefix=f"{prefix}.c_proj", parallel="row")
        self.num_heads = self.c_attn.num_heads  # this rank's
        self.size = self.num_heads * self.head_dim
        max_position = min(hf_config.seq_length, hf_config.max_position_embeddings)  # max_model_len's cap
        self.rotary = RotaryEmbedding(self.head_dim, max_position, float(hf_config.rotary_emb_base),
                                      {"rope_type": "default"})
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim, scale=self.head_dim ** -0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata):
        q, k, v = self.c_attn(hidden).split(self.size, dim=-1)      # [T, 3 H D] -> 3 x [T, H D]
        return self.c_proj(self.attn(q, k, v, meta, self.rotary, positions))  # [T, H D] -> [T, E]


class QWenMLP(nn.Module):
    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        width = hf_config.intermediate_size // 2
        bias = not hf_config.no_bias
        # w2 (the gate) first: SiluAndMul takes silu of the first half
        self.gate_up_proj = MergedLinear(hf_config.hidden_size, {"w2": width, "w1": width}, bias=bias,
                                         quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.act = SiluAndMul()
        self.c_proj = Linear(width, hf_config.hidden_size, bias=bias, quant_config=quant_config,
                             prefix=f"{prefix}.c_proj", parallel="row")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.gate_up_proj(hidden)))     # [T, 2I] -> [T, I] -> [T, E]


class QWenBlock(nn.Module):
    def __init__(self, hf_config, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        self.ln_1 = RMSNorm(hf_config.hidden_size, hf_config.layer_norm_epsilon)
        self.attn = QWenAttention(hf_config, quant_config, f"{prefix}.attn")
        self.ln_2 = RMSNorm(hf_config.hidden_size, hf_config.layer_norm_epsilon)
        self.mlp = QWenMLP(hf_config, quant_config, f"{prefix}.mlp")

    def forward(self, positions, hidden, residual, meta):
        hidden, residual = norm_in(self.ln_1, hidden, residual)
        hidden = self.attn(positions, hidden, meta)
        hidden, residual = self.ln_2(hidden, residual)
        return self.mlp(hidden), residual


class QWenLMHeadModel(CausalLM):
    """[T] ids -> [T, E] hidden states; parameters named as the checkpoint's, less `transformer.`,
    with `wte` as `embed_tokens` and w2|w1 fused into `gate_up_proj`."""

    checkpoint_prefix = "transformer."
    packed_modules_mapping = {"gate_up_proj": ("w2", "w1")}

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__()
        self.hf_config = hf_config
        self.embed_tokens = VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size)
        self.h = nn.ModuleList(QWenBlock(hf_config, quant_config, f"h.{i}") for i in range(hf_config.num_hidden_layers))
        self.ln_f = RMSNorm(hf_config.hidden_size, hf_config.layer_norm_epsilon)
        self.build_lm_head(hf_config, quant_config, tied_by_default=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata):
        hidden = self.embed_tokens(input_ids)                       # [T, E]
        residual = None
        for block in self.h:
            hidden, residual = block(positions, hidden, residual, meta)
        hidden, _ = self.ln_f(hidden, residual)
        return hidden

    def checkpoint_name(self, name: str) -> str | None:
        if "rotary_emb.inv_freq" in name or name.endswith("attn.masked_bias"):  # buffers, recomputed
            return None
        name = super().checkpoint_name(name)
        if name is not None and name.startswith("wte."):
            return "embed_tokens." + name.removeprefix("wte.")
        return name
