"""Gated activations of the MLP."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.kernels import gelu_tanh_and_mul, silu_and_mul


class SiluAndMul(nn.Module):
    """[T, 2I] (gate | up) -> [T, I]."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)


class GeluTanhAndMul(nn.Module):
    """[T, 2I] (gate | up) -> [T, I] with GELU's tanh approximation (Gemma's gelu_pytorch_tanh)."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_and_mul(gate_up)
