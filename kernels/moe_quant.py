"""Quantized expert weights for the fused MoE: the grouped GEMM dequantizes each B tile in registers, so
no dense copy of an expert is ever written.

    int (GPTQ / AWQ after load): qweight int32 [E, K * bits // 32, N], K rows packed lowest bits first
        (quant_gemm's layout, per expert), scales and zeros [E, G, N] in the activations' dtype;
        W[e][k, n] = (q[k, n] - zeros[k // group, n]) * scales[k // group, n]
    fp8 (e4m3): weight [E, N, K], scales float32 [E, N]; W[e][n, k] = weight[n, k] * scales[n]
        (the per-channel scale leaves the K sum: it multiplies the accumulator once)

Logically each is the float kernel's B [E, N, K]; `QuantExperts.dequantize` gives one expert's [N, K].
"""

import torch

from ._triton import tl, triton
from .moe_tiles import moe_config, table_tiles
from .quant_experts import QuantExperts
from .quant_gemm import _biased_codes, _kernel_group_size

FP8_DTYPE = torch.float8_e4m3fn


def quant_moe_tiles(num_tokens, top_k, num_experts, w13_rows, hidden_size):
    """The MOE_CONFIGS row with float32's K tiles (half the bf16 depth): a dequantized B tile lives in
    registers as float32, and the int32 words of an int tile take a float32 tile's shared memory."""
    return table_tiles(moe_config(num_tokens, top_k, num_experts), num_tokens, top_k, num_experts, w13_rows,
                       hidden_size, torch.float32)


@triton.jit(do_not_specialize=["num_padded", "num_entries"])
def _moe_quant_gemm_kernel(a_ptr, b_ptr, scales_ptr, zeros_ptr, c_ptr, weights_ptr, bias_ptr, sorted_ids_ptr,
                           expert_ids_ptr, num_post_ptr, N, K, num_padded, num_entries, stride_am, stride_be,
                           stride_bk, stride_bn, stride_se, stride_sg, stride_cm, stride_bias_e,
                           TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                           FP8: tl.constexpr, GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           GROUP_M: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """`_moe_gemm_kernel` with B dequantized tile by tile: C[entry] = (A[entry // TOP_K] @ W[expert]^T
    + bias[expert]) (* weight[entry]) for the entries of one block."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    first_m = pid // (GROUP_M * num_pid_n) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):  # past the real blocks: nothing to read
        return
    entries = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    entry_mask = entries < num_entries
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    a_rows = a_ptr + (entries // TOP_K).to(tl.int64)[:, None] * stride_am
    b_expert = b_ptr + expert * stride_be
    scale_rows = scales_ptr + expert * stride_se
    zero_rows = zeros_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kn_mask = k_mask[:, None] & n_mask[None, :]
        a = tl.load(a_rows + offs_k[None, :], mask=entry_mask[:, None] & k_mask[None, :], other=0.0)
        if FP8:  # e4m3 widens exactly to fp16 / bf16 / fp32; the scale comes after the sum
            b = tl.load(b_expert + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None], mask=kn_mask,
                        other=0.0).to(tl.float32)
        else:  # each int32 loaded once per row it holds (L1 hits), its codes dequantized in fp32
            packed = tl.load(b_expert + (offs_k // PER)[:, None] * stride_bk + offs_n[None, :], mask=kn_mask,
                             other=0)
            q = _biased_codes((packed >> ((offs_k % PER) * BITS)[:, None]) & ((1 << BITS) - 1))  # 2**23 + q
            if GROUP_SIZE % BLOCK_K == 0:  # the whole K tile lies in one group: one row of scales
                group_offs = (k0 // GROUP_SIZE) * stride_sg + offs_n[None, :]
                group_mask = n_mask[None, :]
            else:
                group_offs = (offs_k // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
                group_mask = kn_mask
            scale = tl.load(scale_rows + group_offs, mask=group_mask, other=0.0).to(tl.float32)
            zero = tl.load(zero_rows + group_offs, mask=group_mask, other=0.0).to(tl.float32) + 8388608.0
            b = (q - zero) * scale  # q - z exactly: one subtraction per code
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(a.dtype).to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if FP8:
        acc *= tl.load(scale_rows + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + entries, mask=entry_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + entries.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=entry_mask[:, None] & n_mask[None, :])


def moe_quant_gemm(a, b: QuantExperts, bias, out, weights, sorted_ids, expert_ids, num_post, top_k, mul_weight,
                   tiles):
    """`moe_gemm` for quantized experts: out[entry] = (a[entry // top_k] @ W[expert]^T + bias[expert])
    (* weights[entry] if mul_weight), W dequantized tile by tile."""
    block_m, block_n, block_k, group_m, num_warps, num_stages = tiles
    _, n, k = b.shape
    if b.is_fp8:
        stride_be, stride_bk, stride_bn = b.weight.stride(0), 1, b.weight.stride(1)
        assert b.weight.stride(2) == 1
        stride_se, stride_sg, zeros, group_size = b.scales.stride(0), 0, b.scales, block_k
    else:
        stride_be, stride_bk, stride_bn = b.weight.stride(0), b.weight.stride(1), 1
        assert b.weight.stride(2) == 1 and b.scales.stride() == b.zeros.stride() and b.scales.stride(2) == 1
        stride_se, stride_sg, zeros = b.scales.stride(0), b.scales.stride(1), b.zeros
        group_size = _kernel_group_size(b.group_size, k, block_k)
    grid = (triton.cdiv(sorted_ids.numel(), block_m) * triton.cdiv(n, block_n),)
    _moe_quant_gemm_kernel[grid](
        a, b.weight, b.scales, zeros, out, weights, out if bias is None else bias, sorted_ids, expert_ids,
        num_post, n, k, sorted_ids.numel(), out.shape[0], a.stride(0), stride_be, stride_bk, stride_bn,
        stride_se, stride_sg, out.stride(0), 0 if bias is None else bias.stride(0), TOP_K=top_k,
        MUL_WEIGHT=mul_weight, HAS_BIAS=bias is not None, FP8=b.is_fp8, GROUP_SIZE=group_size, BITS=b.bits,
        PER=32 // b.bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        # Triton's CPU interpreter multiplies bf16's raw uint16 storage in tl.dot: go through fp32.
        UPCAST_DOT=not a.is_cuda and a.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", num_warps=num_warps, num_stages=num_stages)

