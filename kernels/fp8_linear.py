"""FP8 (e4m3) linear layers: weight [N, K] fp8 with one float32 scale per output channel.

On CUDA a single row (batch-1 decode, bound by reading the weight) takes a Triton GEMV that streams the
fp8 weight; more rows are quantized per row by one Triton kernel and multiplied on FP8 tensor cores by
`torch._scaled_mm`. Elsewhere the weight is dequantized to the activations' dtype (weight-only).
"""

import torch
from torch.nn import functional as F

from ._triton import next_power_of_2, tl, triton, use_triton

FP8_MAX = 448.0
# (BLOCK_N, BLOCK_K, warps, stages); `_fp8_gemv_config` picks by shape (fastest in an H100 sweep).
FP8_GEMV_CONFIGS = ((8, 512, 4, 3), (4, 512, 4, 3), (16, 256, 4, 3), (2, 1024, 4, 3),
                    (8, 256, 4, 3), (16, 128, 4, 4), (32, 128, 4, 4), (4, 1024, 8, 3))


def fp8_linear_ref(x, weight, scale, bias=None):
    """Weight-only: x @ (weight * scale[:, None])^T (+ bias) in x's dtype."""
    return F.linear(x, (weight.float() * scale.float()[:, None]).to(x.dtype), bias)


def quantize_rows_fp8_ref(x):
    """x [M, K] -> (fp8 [M, K], float32 scale [M, 1]) with each row's amax at e4m3's largest value."""
    scale = (x.abs().amax(dim=1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, N, K, stride_wn,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w = tl.load(rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        acc += w.to(tl.float32) * x[None, :]
    out = tl.sum(acc, axis=1) * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm, BLOCK_K: tl.constexpr,
                          ONE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if ONE_PASS:  # the row fits one tile: read once
        offs = tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / 448.0, 1e-12)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)  # IEEE division, as torch
        tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, axis=0) / 448.0, 1e-12)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0)  # IEEE division, as torch
            tl.store(q_ptr + row * stride_qm + offs, q.to(q_ptr.dtype.element_ty), mask=offs < K)
    tl.store(scale_ptr + row, scale)


def _fp8_gemv_config(n: int, k: int):
    if k >= 8192:
        return FP8_GEMV_CONFIGS[3]  # deep rows: two channels per program, long K tiles
    if n >= 16384:
        return FP8_GEMV_CONFIGS[2]
    return FP8_GEMV_CONFIGS[0] if n >= 6144 else FP8_GEMV_CONFIGS[1]


def fp8_gemv_triton(x, weight, scale, bias=None, config=None):
    """x [1, K] -> [1, N]: `fp8_linear_ref` for one row, the fp8 weight streamed once."""
    n, k = weight.shape
    if x.shape != (1, k):
        raise ValueError(f"the FP8 GEMV takes one row of {k} values, got {list(x.shape)}")
    block_n, block_k, num_warps, num_stages = config or _fp8_gemv_config(n, k)
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _fp8_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, scale, bias if bias is not None else out, out, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
        num_stages=num_stages)
    return out


def quantize_rows_fp8_triton(x):
    """`quantize_rows_fp8_ref` in one kernel (a row per program)."""
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    block_k = min(next_power_of_2(k), 8192)
    _quantize_rows_kernel[(m,)](x, q, scale, k, x.stride(0), q.stride(0), BLOCK_K=block_k,
                                ONE_PASS=block_k >= k, num_warps=8 if block_k >= 4096 else 4)
    return q, scale


def fp8_scaled_mm(x, weight, scale, bias=None):
    """FP8 tensor cores: rows of x quantized with their own scale, rowwise-scaled product."""
    x_fp8, x_scale = quantize_rows_fp8_triton(x)
    return torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=scale.view(1, -1), bias=bias,
                            out_dtype=x.dtype)


def fp8_linear(x, weight, scale, bias=None):
    """x [M, K] @ (weight * scale[:, None])^T (+ bias): GEMV for one row and `fp8_scaled_mm` for more
    on CUDA (bf16/fp16; _scaled_mm needs bf16 and multiples of 16), the reference elsewhere."""
    if not use_triton(x) or x.dtype not in (torch.bfloat16, torch.float16):
        return fp8_linear_ref(x, weight, scale, bias)
    if x.shape[0] == 1:
        return fp8_gemv_triton(x, weight, scale, bias)
    if x.dtype == torch.bfloat16 and x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0:
        return fp8_scaled_mm(x, weight, scale, bias)
    return fp8_linear_ref(x, weight, scale, bias)
