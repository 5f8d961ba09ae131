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


def run_pre_norm_layers(layers, final_norm, hidden, positions, meta, aux_layer_ids=()):
    """A stack of PreNormBlocks over the embedded tokens; the last residual add fuses into the final norm.
    With `aux_layer_ids` (EAGLE-3), also the residual stream entering each of those layers (an id equal
    to the number of layers: leaving the last one): returns (hidden, [[T, E] per id])."""
    residual = None
    aux = []
    for index, layer in enumerate(layers):
        if index in aux_layer_ids:
            aux.append(hidden if residual is None else hidden + residual)
        hidden, residual = layer(positions, hidden, residual, meta)
    if len(layers) in aux_layer_ids:
        aux.append(hidden + residual)
    hidden, _ = final_norm(hidden, residual)
    return (hidden, aux) if aux_layer_ids else hidden
