"""The decoder layer most families share: norm, token mixer, norm, MLP, with the residual stream carried to
the next layer un-added, so that every residual add fuses into the norm that follows it."""
from __future__ import annotations

from torch import nn


def norm_in(norm, hidden, residual):
    """A layer's first norm: the previous layer's residual add fused into it (the first layer has none)."""
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)


class PreNormBlock(nn.Module):
    """A family's layer sets `input_layernorm`, `post_attention_layernorm` and `mlp`, and either `self_attn`
    (called as `self_attn(positions, hidden, meta)`) or its own `mix` (a hybrid layer's linear attention)."""

    def mix(self, positions, hidden, meta):
        return self.self_attn(positions, hidden, meta)

    def forward(self, positions, hidden, residual, meta):
        hidden, residual = norm_in(self.input_layernorm, hidden, residual)
        hidden = self.mix(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def run_pre_norm_layers(layers, final_norm, hidden, positions, meta):
    """A stack of PreNormBlocks over the embedded tokens; the last residual add fuses into the final norm."""
    residual = None
    for layer in layers:
        hidden, residual = layer(positions, hidden, residual, meta)
    hidden, _ = final_norm(hidden, residual)
    return hidden
