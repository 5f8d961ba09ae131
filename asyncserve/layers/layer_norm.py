"""LayerNorm with its bias (OPT, GPT-2): torch's own kernel, one launch, fp32 statistics."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm(nn.Module):
    """[T, E] -> [T, E]; `affine=False` keeps no weight or bias (OPT's layer_norm_elementwise_affine)."""

    is_norm = True  # random (dummy) weights leave it as built: see models/loader.py

    def __init__(self, hidden_size: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size)) if affine else None
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
