"""The short causal depthwise convolution in front of a linear-attention layer, carried across steps.

Each sequence keeps a conv state [D, W]: its last W inputs (the layout of flash-linear-attention and of
transformers' cache), so a prompt split over steps, or a decode, continues exactly where the last step
stopped. A fresh sequence's state is zeros, the causal padding of a whole-prompt convolution. The output
goes through SiLU, as every Gated DeltaNet layer has it. Pure-torch references here; on CUDA,
flash-linear-attention's Triton kernels (`fla-core`, imported lazily).
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F


@functools.cache
def fla_conv_ops():
    """flash-linear-attention's (varlen convolution, one-token update), or None without fla-core."""
    try:
        from fla.modules.causal_conv1d import causal_conv1d, causal_conv1d_update
    except ImportError:
        return None
    return causal_conv1d, causal_conv1d_update


def _use_fla(x: torch.Tensor) -> bool:
    return x.is_cuda and fla_conv_ops() is not None


def causal_conv1d_varlen_ref(x: torch.Tensor, weight: torch.Tensor, initial_state: torch.Tensor,
                             cu_seqlens: torch.Tensor):
    """x [T, D] (flat tokens of B sequences), weight [D, W], initial_state [B, D, W], cu_seqlens [B + 1]
    -> (silu(conv(x)) [T, D], final states [B, D, W]: each sequence's last W inputs)."""
    width = weight.shape[1]
    out = torch.empty_like(x)
    finals = []
    bounds = cu_seqlens.tolist()
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        history = torch.cat([initial_state[index].to(x.dtype), x[start:end].t()], dim=1)  # [D, W + L]
        conv = F.conv1d(history[None, :, 1:], weight[:, None, :].to(x.dtype), groups=weight.shape[0])
        out[start:end] = F.silu(conv[0].t())
        finals.append(history[:, -width:])
    return out, torch.stack(finals)


def causal_conv1d_varlen_fla(x, weight, initial_state, cu_seqlens, cu_seqlens_host=None):
    """`cu_seqlens_host` (int64, CPU; with `cu_seqlens` int64 too): fla builds its chunk indices on the host,
    without a device sync, and reuses them while the same tensors come back (the next layers of the step)."""
    conv, _ = fla_conv_ops()
    out, final = conv(x[None], weight, initial_state=initial_state, output_final_state=True, activation="silu",
                      cu_seqlens=cu_seqlens.long(), cu_seqlens_cpu=cu_seqlens_host)
    return out[0], final


def causal_conv1d_varlen(x, weight, initial_state, cu_seqlens, cu_seqlens_host=None):
    """fla-core's kernel on CUDA (when installed), the torch reference elsewhere."""
    if _use_fla(x):
        return causal_conv1d_varlen_fla(x, weight, initial_state, cu_seqlens, cu_seqlens_host)
    return causal_conv1d_varlen_ref(x, weight, initial_state, cu_seqlens)


def causal_conv1d_update_ref(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor):
    """One token per sequence: x [N, D], weight [D, W], state [N, D, W] -> (silu(conv) [N, D], new state
    [N, D, W]: the last W - 1 inputs and x)."""
    new_state = torch.cat([state[:, :, 1:].to(x.dtype), x[:, :, None]], dim=2)
    conv = F.conv1d(new_state, weight[:, None, :].to(x.dtype), groups=weight.shape[0])  # [N, D, 1]
    return F.silu(conv[:, :, 0]), new_state


def causal_conv1d_update_fla(x, weight, state):
    """`causal_conv1d_update_ref` through fla-core's kernel, which updates `state` in place."""
    _, update = fla_conv_ops()
    out, state = update(x, state, weight=weight, activation="silu")
    return out, state


def causal_conv1d_update(x, weight, state):
    """fla-core's kernel on CUDA (when installed), the torch reference elsewhere; `state` may be updated in
    place, so pass a gathered copy and keep the returned one."""
    run = causal_conv1d_update_fla if _use_fla(x) else causal_conv1d_update_ref
    return run(x, weight, state)
