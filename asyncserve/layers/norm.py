"""RMSNorm, fused with the residual add that precedes it in every pre-norm block."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.kernels import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    is_norm = True  # random (dummy) weights leave it as built: see models/loader.py
    gemv_fusable = True  # a one-row GEMV may apply it to its input (kernels/gemv.py); not Gemma's form
    unit_offset = False  # Gemma's form scales by (1 + weight)

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without `residual`: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return rms_norm(x, self.weight, self.eps)
        return fused_add_rms_norm(x, residual, self.weight, self.eps)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: scales by (1 + weight), in fp32 (the checkpoint stores weight - 1)."""

    gemv_fusable = False
    unit_offset = True

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__(hidden_size, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return rms_norm(x, self.weight, self.eps, unit_offset=True)
        return fused_add_rms_norm(x, residual, self.weight, self.eps, unit_offset=True)


def norm_in(norm, hidden, residual):
    """A layer's first norm: the previous layer's residual add fused into it (the first layer has none)."""
    if residual is None:
        return norm(hidden), hidden
    return norm(hidden, residual)
