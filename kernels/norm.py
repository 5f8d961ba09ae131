"""RMSNorm with Hugging Face LlamaRMSNorm numerics: normalise in fp32, round to the input
dtype, then multiply by the weight (rounded again); the fused form adds the residual first.
`unit_offset=True` is Gemma's RMSNorm: scale by (1 + weight) in fp32, rounded once at the end."""

import torch

from ._triton import tl, triton, use_triton, next_power_of_2


def rms_norm_ref(x, weight, eps, unit_offset=False):
    """x [..., hidden], weight [hidden] -> [..., hidden] in x.dtype."""
    hidden = x.float()
    hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (hidden * (1.0 + weight.float())).to(x.dtype)
    return (weight * hidden.to(x.dtype)).to(x.dtype)


def fused_add_rms_norm_ref(x, residual, weight, eps, unit_offset=False):
    """-> (rms_norm(x + residual) * weight, x + residual); the sum is rounded to x.dtype first."""
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps, unit_offset), new_residual


@triton.jit
def _rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, eps,
                     stride_x, stride_residual, stride_out, stride_residual_out,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                     UNIT_OFFSET: tl.constexpr):
    # One program per row; the row stays in registers between the two passes.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_residual_out + cols, x, mask=mask)
    hidden = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(hidden * hidden, axis=0) / HIDDEN + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if UNIT_OFFSET:
        out = hidden * inv_rms * (1.0 + weight.to(tl.float32))
    else:
        normed = (hidden * inv_rms).to(x.dtype).to(tl.float32)
        # A product of two bf16/fp16 values is exact in fp32: one rounding, as torch's weight * h.
        out = normed * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, eps, unit_offset):
    hidden = x.shape[-1]
    x2d = x.reshape(-1, hidden)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(x2d.shape, dtype=x.dtype, device=x.device)
    residual2d = residual_out = out  # placeholders when there is no residual
    if residual is not None:
        residual2d = residual.reshape(-1, hidden)
        if residual2d.stride(-1) != 1:
            residual2d = residual2d.contiguous()
        residual_out = torch.empty_like(out)
    block = next_power_of_2(hidden)
    if x2d.shape[0] > 0:
        _rms_norm_kernel[(x2d.shape[0],)](
            out, residual_out, x2d, residual2d, weight, eps,
            x2d.stride(0), residual2d.stride(0), out.stride(0), residual_out.stride(0),
            HIDDEN=hidden, BLOCK=block, ADD_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset,
            num_warps=min(16, max(1, block // 512)),
        )
    return out.view(x.shape), residual_out.view(x.shape)


def rms_norm_triton(x, weight, eps, unit_offset=False):
    """Triton version of `rms_norm_ref`."""
    return _launch(x, None, weight, eps, unit_offset)[0]


def fused_add_rms_norm_triton(x, residual, weight, eps, unit_offset=False):
    """Triton version of `fused_add_rms_norm_ref`: one read of x and residual, two writes."""
    return _launch(x, residual, weight, eps, unit_offset)


def rms_norm(x, weight, eps, unit_offset=False):
    """Triton on CUDA, torch reference elsewhere."""
    return (rms_norm_triton if use_triton(x) else rms_norm_ref)(x, weight, eps, unit_offset)


def fused_add_rms_norm(x, residual, weight, eps, unit_offset=False):
    """Triton on CUDA, torch reference elsewhere."""
    fused = fused_add_rms_norm_triton if use_triton(x) else fused_add_rms_norm_ref
    return fused(x, residual, weight, eps, unit_offset)
