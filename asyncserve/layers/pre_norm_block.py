"""The decoder layer most families share: norm, token mixer, norm, MLP, with the residual stream carried to
the next layer un-added, so that every residual add fuses into the norm that follows it."""
from __future__ import annotations

from torch import nn

from asyncserve.layers.norm import norm_in


def _splits(module, second_half: str) -> bool:
    """Whether `module`'s own forward is the projection then `second_half` (the class that defines forward
    defines it too), so that calling the two apart computes the same thing."""
    if module is None:
        return False
    owner = next(klass for klass in type(module).__mro__ if "forward" in vars(klass))
    return second_half in vars(owner)


class PreNormBlock(nn.Module):
    """A family's layer sets `input_layernorm`, `post_attention_layernorm` and `mlp`, and either `self_attn`
    (called as `self_attn(positions, hidden, meta)`) or its own `mix` (a hybrid layer's linear attention).

    Batch-1 decode may run each norm inside the one-row GEMV of the projection after it (the attention's
    qkv, the MLP's gate|up), where the layer's parts expose those projections (`self_attn.qkv_proj` with
    `attend`, `mlp.gate_up_proj` with `from_gate_up`) and the start-up timing found it faster."""

    fused_norm_rows = False  # set by tune_single_row_fusions

    def mix(self, positions, hidden, meta):
        return self.self_attn(positions, hidden, meta)

    def forward(self, positions, hidden, residual, meta):
        if self.fused_norm_rows and hidden.shape[0] == 1:
            return self._forward_one_row(positions, hidden, residual, meta)
        hidden, residual = norm_in(self.input_layernorm, hidden, residual)
        hidden = self.mix(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def _forward_one_row(self, positions, hidden, residual, meta):
        qkv, residual = self.self_attn.qkv_proj.forward_normed(self.input_layernorm, hidden, residual)
        hidden = self.self_attn.attend(positions, qkv, meta)
        gate_up, residual = self.mlp.gate_up_proj.forward_normed(self.post_attention_layernorm, hidden, residual)
        return self.mlp.from_gate_up(gate_up), residual

    def tune_single_row_fusions(self, timings: dict) -> list[str]:
        """Lets the qkv and gate|up projections time their norm-fused GEMVs; the one-row path is taken where
        either chose one (forward_normed runs the norm and the product apart for the other)."""
        attn, mlp = getattr(self, "self_attn", None), self.mlp
        if (type(self).mix is not PreNormBlock.mix or not _splits(attn, "attend") or not _splits(mlp, "from_gate_up")
                or not all(getattr(n, "gemv_fusable", False) for n in (self.input_layernorm,
                                                                        self.post_attention_layernorm))):
            return []
        lines = []
        for projection in (attn.qkv_proj, mlp.gate_up_proj):
            tune = getattr(projection.quant_method, "tune_normed_row", None)
            line = tune(projection, timings) if tune else None
            if line:
                lines.append(line)
        self.fused_norm_rows = any(getattr(p.quant_method, "normed_row", None) is not None
                                   for p in (attn.qkv_proj, mlp.gate_up_proj))
        return lines


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
