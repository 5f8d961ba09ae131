"""Activations of the MLP: the gated SwiGLU of Llama-style blocks, and the plain ones of OPT / GPT-2."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from asyncserve.errors import UnsupportedModelError
from asyncserve.kernels import gelu_tanh_and_mul, silu_and_mul


class SiluAndMul(nn.Module):
    """[T, 2I] (gate | up) -> [T, I]."""

    gemv_activation = "silu"  # a one-row GEMV may apply it to its input (kernels/gemv.py)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(gate_up)


class GeluTanhAndMul(nn.Module):
    """[T, 2I] (gate | up) -> [T, I] with GELU's tanh approximation (Gemma's gelu_pytorch_tanh)."""

    gemv_activation = "gelu_tanh"

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return gelu_tanh_and_mul(gate_up)


class GeluTanh(nn.Module):
    """GPT-2's `gelu_new`: the tanh approximation of GELU, in torch's single kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


# Hugging Face `activation_function` names -> the module computing them.
_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": GeluTanh,
    "gelu_fast": GeluTanh,
    "gelu_pytorch_tanh": GeluTanh,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}


def get_activation(name: str) -> nn.Module:
    """The activation a checkpoint's config names."""
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activation_function {name!r} is not supported "
                                    f"(supported: {', '.join(sorted(_ACTIVATIONS))}).")
    return _ACTIVATIONS[name]()
