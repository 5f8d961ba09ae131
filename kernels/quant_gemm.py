"""STAND-IN (pure torch) for the quantized GEMM of W4A16/W8A16 weights; the Triton version with the
same names and semantics replaces this file.

Canonical layout: q [K, N] of `bits`-bit unsigned ints, packed as `32 // bits` consecutive K-rows per
int32 (lowest bits first) into qweight [K * bits // 32, N]; per group of `group_size` K-rows a float
zero point and scale: W[k, n] = (q[k, n] - zeros[k // group_size, n]) * scales[k // group_size, n].
"""
from __future__ import annotations

import torch


def pack_int_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] (values in [0, 2**bits)) -> int32 [K * bits // 32, N]."""
    per_word = 32 // bits
    k, n = q.shape
    rows = q.to(torch.int64).reshape(k // per_word, per_word, n)
    shifts = (torch.arange(per_word, device=q.device, dtype=torch.int64) * bits).view(1, per_word, 1)
    words = (rows << shifts).sum(dim=1)  # disjoint bit fields: the sum is the bitwise or
    return (words - ((words >> 31) << 32)).to(torch.int32)  # two's complement into int32


def unpack_int_rows(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 [K * bits // 32, N] -> [K, N] int32 values in [0, 2**bits)."""
    per_word = 32 // bits
    shifts = (torch.arange(per_word, device=qweight.device, dtype=torch.int32) * bits).view(1, per_word, 1)
    values = (qweight.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(-1, qweight.shape[1])[:k]


def dequantize_ref(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bits: int, k: int) -> torch.Tensor:
    """The float weight W [K, N] in the scales' dtype."""
    q = unpack_int_rows(qweight, bits, k).to(scales.dtype)
    group = torch.arange(k, device=qweight.device) // group_size
    return (q - zeros[group]) * scales[group]


def quant_gemm_ref(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, bits: int) -> torch.Tensor:
    """x [M, K] @ W -> [M, N] in x's dtype, dequantizing in float."""
    weight = dequantize_ref(qweight, scales.to(x.dtype), zeros.to(x.dtype), group_size, bits, x.shape[1])
    return x @ weight


def quant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int, bits: int) -> torch.Tensor:
    return quant_gemm_ref(x, qweight, scales, zeros, group_size, bits)
