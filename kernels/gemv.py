"""One-row products x[1, K] @ W[N, K]^T (+ bias): batch-1 decode's every projection.

cuBLAS picks split-K GEMM kernels for some of these shapes that read the weight at about half the
memory bandwidth. This kernel streams W once, rows split over programs, K in pipelined tiles.

With `activation` it takes the MLP's gate|up row [1, 2K] instead of x and applies the gated activation
as it loads it (each program recomputes the K activations it needs, a few microseconds of ALU against
a launch), so batch-1 decode's down projection and the activation before it are one kernel, not two or
three (cuBLAS's split-K adds a reduce). The activation is rounded to x's dtype before the product, as
the separate kernel stores it, so both paths compute the same numbers.

`gemv_normed_triton` does the same for the RMSNorm (with the residual add) in front of a layer's qkv or
gate|up projection: every program takes the row's mean square over the whole hidden row (a few KB from
L2), then normalizes each K tile as it loads it, with kernels/norm.py's roundings; the first program also
stores the new residual. A decoder layer's batch-1 step then launches its two norms inside GEMVs.
"""

import torch
import torch.nn.functional as F

from ._triton import next_power_of_2, tl, triton
from .activation import gated_activation

# (BLOCK_N, BLOCK_K, num_warps, num_stages): the runner times these against cuBLAS per shape.
GEMV_CONFIGS = ((8, 512, 4, 4), (16, 256, 4, 4), (16, 512, 8, 3), (32, 256, 8, 3), (4, 1024, 4, 3))


# Gated activations the GEMV can apply to its input (the names of kernels/activation.py's).
GEMV_ACTIVATIONS = ("silu", "gelu_tanh")


def gemv_ref(x, weight, bias=None, activation=None):
    """x [1, K] (with `activation`: gate|up [1, 2K]), weight [N, K], bias [N] or None -> [1, N]."""
    if activation is not None:
        from .activation import gelu_tanh_and_mul_ref, silu_and_mul_ref
        act = {"silu": silu_and_mul_ref, "gelu_tanh": gelu_tanh_and_mul_ref}[activation]
        x = act(x.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def gemv_normed_ref(hidden, residual, norm_weight, eps, weight, bias=None):
    """(rms_norm(hidden + residual) @ weight.T + bias, hidden + residual) as kernels/norm.py rounds them;
    residual None: the norm of hidden alone, and hidden back as the residual."""
    from .norm import fused_add_rms_norm_ref, rms_norm_ref
    if residual is None:
        return F.linear(rms_norm_ref(hidden, norm_weight, eps), weight, bias), hidden
    normed, residual = fused_add_rms_norm_ref(hidden, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), residual


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, stride_wn,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ACTIVATION: tl.constexpr, res_ptr, norm_w_ptr, res_out_ptr, eps,
                 NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, BLOCK_ROW: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if NORM:  # the whole row's mean square first (and the new residual, stored once)
        row_cols = tl.arange(0, BLOCK_ROW)
        row_mask_k = row_cols < K
        whole = tl.load(x_ptr + row_cols, mask=row_mask_k, other=0.0)
        if ADD_RESIDUAL:
            whole = (whole.to(tl.float32) + tl.load(res_ptr + row_cols, mask=row_mask_k, other=0.0).to(tl.float32)
                     ).to(x_ptr.dtype.element_ty)
            if tl.program_id(0) == 0:
                tl.store(res_out_ptr + row_cols, whole, mask=row_mask_k)
        whole = whole.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=0) / K + eps)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        x = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if NORM:
            if ADD_RESIDUAL:
                x = (x + tl.load(res_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                     ).to(x_ptr.dtype.element_ty).to(tl.float32)
            normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
            x = (normed * tl.load(norm_w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                 ).to(x_ptr.dtype.element_ty).to(tl.float32)
        if ACTIVATION != "":  # x is the gate; the up half follows it
            up = tl.load(x_ptr + K + cols, mask=col_mask, other=0.0).to(tl.float32)
            x = gated_activation(x, up, 0.0, 0.0, ACTIVATION).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_rows + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv_triton(x, weight, bias=None, config=GEMV_CONFIGS[0], activation=None):
    """Triton version of `gemv_ref`; `config` is one of GEMV_CONFIGS, `activation` one of GEMV_ACTIVATIONS."""
    block_n, block_k, num_warps, num_stages = config
    num_rows, k = weight.shape
    assert x.shape == (1, k if activation is None else 2 * k) and x.is_contiguous() and weight.stride(1) == 1
    assert activation is None or activation in GEMV_ACTIVATIONS, activation
    out = torch.empty(1, num_rows, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(num_rows, block_n),)](
        x, weight, bias if bias is not None else weight, out, num_rows, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, ACTIVATION=activation or "",
        res_ptr=x, norm_w_ptr=x, res_out_ptr=x, eps=0.0, NORM=False, ADD_RESIDUAL=False, BLOCK_ROW=1,
        num_warps=num_warps, num_stages=num_stages)
    return out


def gemv_normed_triton(hidden, residual, norm_weight, eps, weight, bias=None, config=GEMV_CONFIGS[0]):
    """Triton version of `gemv_normed_ref` for one row: (out [1, N], the new residual [1, K])."""
    block_n, block_k, num_warps, num_stages = config
    num_rows, k = weight.shape
    assert hidden.shape == (1, k) and hidden.is_contiguous() and weight.stride(1) == 1
    assert residual is None or (residual.shape == (1, k) and residual.is_contiguous())
    out = torch.empty(1, num_rows, dtype=hidden.dtype, device=hidden.device)
    new_residual = hidden if residual is None else torch.empty_like(hidden)
    _gemv_kernel[(triton.cdiv(num_rows, block_n),)](
        hidden, weight, bias if bias is not None else weight, out, num_rows, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, ACTIVATION="",
        res_ptr=residual if residual is not None else hidden, norm_w_ptr=norm_weight, res_out_ptr=new_residual,
        eps=eps, NORM=True, ADD_RESIDUAL=residual is not None, BLOCK_ROW=next_power_of_2(k),
        num_warps=num_warps, num_stages=num_stages)
    return out, new_residual
