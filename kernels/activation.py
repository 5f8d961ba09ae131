"""Gated activations of the MLP over the two halves of the fused projection: SwiGLU
silu(gate) * up, GeGLU gelu_tanh(gate) * up (Gemma's gelu_pytorch_tanh), and GPT-OSS's clamped
SwiGLU (vLLM's "swigluoai"): gate clamped above at `limit`, up to [-limit, limit], then
gate * sigmoid(alpha * gate) * (up + 1)."""

import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton

_BLOCK = 1024


def silu_and_mul_ref(x):
    """x [..., 2I] -> [..., I]."""
    intermediate = x.shape[-1] // 2
    return F.silu(x[..., :intermediate]) * x[..., intermediate:]


def gelu_tanh_and_mul_ref(x):
    """x [..., 2I] -> [..., I]: gelu(gate, approximate="tanh") * up."""
    intermediate = x.shape[-1] // 2
    return F.gelu(x[..., :intermediate], approximate="tanh") * x[..., intermediate:]


def swiglu_oai_and_mul_ref(x, alpha=1.702, limit=7.0):
    """x [..., 2I] -> [..., I]: the clamped SwiGLU of GPT-OSS's experts, in transformers' order of ops."""
    intermediate = x.shape[-1] // 2
    gate = x[..., :intermediate].clamp(max=limit)
    up = x[..., intermediate:].clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


@triton.jit
def gated_activation(gate, up, alpha, limit, ACTIVATION: tl.constexpr):
    """act(gate) * up in float32 for ACTIVATION "silu", "gelu_tanh" or "swigluoai" (alpha, limit used by the
    last only): what every kernel that applies a gated activation in registers computes."""
    if ACTIVATION == "gelu_tanh":  # 0.5 g (1 + tanh(u)) == g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        out = gate / (1.0 + tl.exp(-2.0 * inner)) * up
    elif ACTIVATION == "swigluoai":
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        out = gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    else:
        out = gate / (1.0 + tl.exp(-gate)) * up
    return out


@triton.jit
def _gated_act_kernel(out_ptr, x_ptr, stride_x, stride_out, intermediate, alpha, limit,
                      BLOCK: tl.constexpr, ACTIVATION: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    out = gated_activation(gate, up, alpha, limit, ACTIVATION)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _gated_act_triton(x, activation: str, alpha: float = 0.0, limit: float = 0.0):
    intermediate = x.shape[-1] // 2
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(x2d.shape[0], intermediate, dtype=x.dtype, device=x.device)
    if x2d.shape[0] > 0:
        grid = (x2d.shape[0], triton.cdiv(intermediate, _BLOCK))
        _gated_act_kernel[grid](out, x2d, x2d.stride(0), out.stride(0), intermediate, alpha, limit,
                                BLOCK=_BLOCK, ACTIVATION=activation, num_warps=4)
    return out.view(*x.shape[:-1], intermediate)


def silu_and_mul_triton(x):
    """Triton version of `silu_and_mul_ref`: one pass, silu in fp32."""
    return _gated_act_triton(x, "silu")


def gelu_tanh_and_mul_triton(x):
    """Triton version of `gelu_tanh_and_mul_ref`: one pass, gelu in fp32."""
    return _gated_act_triton(x, "gelu_tanh")


def swiglu_oai_and_mul_triton(x, alpha=1.702, limit=7.0):
    """Triton version of `swiglu_oai_and_mul_ref`: one pass, in fp32."""
    return _gated_act_triton(x, "swigluoai", float(alpha), float(limit))


def silu_and_mul(x):
    """Triton on CUDA, torch reference elsewhere."""
    return (silu_and_mul_triton if use_triton(x) else silu_and_mul_ref)(x)


def gelu_tanh_and_mul(x):
    """Triton on CUDA, torch reference elsewhere."""
    return (gelu_tanh_and_mul_triton if use_triton(x) else gelu_tanh_and_mul_ref)(x)


def swiglu_oai_and_mul(x, alpha=1.702, limit=7.0):
    """Triton on CUDA, torch reference elsewhere."""
    return (swiglu_oai_and_mul_triton if use_triton(x) else swiglu_oai_and_mul_ref)(x, alpha, limit)
