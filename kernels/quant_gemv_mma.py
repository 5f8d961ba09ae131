"""int4 products on the tensor cores, for GPTQ's packed layout (int_packing): few rows (1 to 128, K split to
fill the SMs) and, in row tiles of up to 128 without K-splits, prefill-sized ones without a dense copy.

Why: the CUDA-core kernels spend several instructions on every weight code and one FMA per code and row of
x, so a few rows of x cost nearly a few times one row. Here the tensor cores do the multiply-adds of up to 128
rows at once, and a code costs a shift, a mask-and-or, half a byte permute and half a packed subtraction:
OR-ing the 4-bit code q into the exponent pattern of 128.0 (bf16, 0x4300) or 1024.0 (fp16, 0x6400) gives the
float MAGIC + q exactly, with no conversion instruction, and subtracting MAGIC + z (z the group's zero point,
an integer in every canonical layout) leaves q - z exactly; the scale multiplies each group's sum once per
output. On an H100 start-up timing kept the first version (which took MAGIC + z times the sum of x out of each
group's sum instead, costing more than the unpacking at 64 rows) for 8 to 64 rows (16 rows of the 8B's
projections: 4.36 ms for 32 layers against 6.35 ms, bf16 5.21 ms); one row keeps the GEMV.

The product is computed transposed (out^T = W^T x^T, "swap AB"): the weight tile is the MMA's left operand,
whose rows fill the 64-row tensor-core tile, so that on Hopper it is fed from registers where it was
unpacked, and the few rows of x (padded to 16) are the right operand. The K order inside a tile is free:
code j of every int32 of a 128-row group is one MMA over the 16 packed rows, with x's rows j, j + 8, ...
Gathering those (every 8th element) costs eight times the L1 traffic of a contiguous read, which at 16 or
more rows of x slows the kernel most (docs/benchmarks.md, ninth session); `permute_x` has the wrapper reorder
x once per call (one copy of M x K values) so that each code position's elements lie contiguous.
"""

from typing import NamedTuple

import torch

from ._triton import tl, triton
from .int_packing import check_packed_operands
from .split_k import SPLIT_K_MAX_ROWS, split_output, store_split


class MmaGemvConfig(NamedTuple):
    """Tiles of the tensor-core product: output columns per program, rows of x per program (16 to 128; the
    MMA's smallest N is 8, Triton's dot 16), K-splits (meeting in the workspace), warps and stages."""
    block_n: int
    block_m: int
    split_k: int
    num_warps: int
    num_stages: int
    permute_x: bool = False  # x reordered once per call so each code position's elements lie contiguous


K_TILE = 128  # one tile is 16 packed int32 rows: one MMA of depth 16 per code position
MMA_TILE_ROWS = 128  # the largest row tile (the MMA's N): more rows take more row tiles
# (magic bit pattern, its value) per activation dtype: MAGIC | q is the float MAGIC + q for q < 16
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


def mma_applies(x: torch.Tensor, bits: int, group_size: int) -> bool:
    """int4 of bf16/fp16 activations, K and the groups in whole 128-row tiles."""
    k = x.shape[1]
    group_size = k if group_size == -1 or group_size >= k else group_size
    return bits == 4 and x.dtype in _MAGIC and k % K_TILE == 0 and group_size % K_TILE == 0


@triton.jit
def _quant_gemm_mma_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr, ws_ptr, arrivals_ptr, M, N, K,
                           num_splits, stride_xm, stride_qk, stride_sg, stride_om,
                           GROUP_SIZE: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, SPLITS: tl.constexpr,
                           PERMUTED_X: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    ROWS: tl.constexpr = 16  # packed int32 rows of one 128-deep K tile
    num_tiles = K // (ROWS * 8)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)  # a run-time value: one compile for any split count
    first = tl.program_id(1) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, num_tiles)
    x_rows = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for tile in range(first, last):
        offs_kp = tile * ROWS + tl.arange(0, ROWS)
        packed = tl.load(qw_ptr + offs_kp[None, :] * stride_qk + offs_n[:, None], mask=n_mask[:, None], other=0)
        group = tile * (ROWS * 8) // GROUP_SIZE
        scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * stride_sg + offs_n, mask=n_mask, other=0.0)
        # (MAGIC + q) - (MAGIC + z) = q - z exactly in x's dtype for integer zero points (every canonical
        # layout's): two codes per packed subtraction, and no sum of x to take back out.
        offset = (zero + MAGIC_VALUE).to(x_ptr.dtype.element_ty)[:, None]
        dot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for j in tl.static_range(8):
            w = (((packed >> (4 * j)) & 0xF) | MAGIC).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True) - offset
            if PERMUTED_X:  # code position j's 16 elements of this tile, contiguous
                offs_k = tile * (ROWS * 8) + j * ROWS + tl.arange(0, ROWS)
            else:
                offs_k = offs_kp * 8 + j
            x = tl.load(x_rows + offs_k[:, None], mask=m_mask[None, :], other=0.0)  # [ROWS, BLOCK_M]
            dot = tl.dot(w, x, dot)
        acc += scale[:, None] * dot
    out = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    tile_id = pid_m * tl.num_programs(0) + pid_n
    store_split(out, out_ptrs, ws_ptrs, m_mask[:, None] & n_mask[None, :], arrivals_ptr, tile_id, num_splits, SPLITS,
                 BLOCK_M, BLOCK_N)


def quant_gemm_mma(x, qweight, scales, zeros, group_size, bits, config: MmaGemvConfig):
    """x [M, K] @ the int4 weight on the tensor cores (see `mma_applies`); same contract as `quant_gemm_ref` up
    to fp32 summation order. K is split only for up to SPLIT_K_MAX_ROWS rows (the workspace's), one split past
    that, where the row tiles fill the SMs anyway."""
    group_size = check_packed_operands(x, qweight, scales, zeros, group_size, bits)
    if not mma_applies(x, bits, group_size):
        raise ValueError(f"the tensor-core product takes int4 weights of bf16/fp16 activations, K and groups in "
                         f"multiples of {K_TILE}; got {bits} bits, {x.dtype}, K={x.shape[1]}, group {group_size}")
    m, k = x.shape
    n = qweight.shape[1]
    block_m = max(16, min(config.block_m, MMA_TILE_ROWS, triton.next_power_of_2(m)))
    split_k = max(1, min(config.split_k, k // K_TILE)) if m <= SPLIT_K_MAX_ROWS else 1
    if config.permute_x:  # [M, tiles, 16 packed rows, 8 codes] -> [M, tiles, 8 codes, 16 packed rows]
        x = x.reshape(m, k // K_TILE, K_TILE // 8, 8).transpose(2, 3).reshape(m, k)
    x = x if x.stride(1) == 1 else x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    out, ws, arrivals, splits = split_output(m, n, split_k, True, x)
    if m == 0 or n == 0:
        return out.to(x.dtype)
    magic, magic_value = _MAGIC[x.dtype]
    grid = (triton.cdiv(n, config.block_n), split_k, triton.cdiv(m, block_m))
    _quant_gemm_mma_kernel[grid](
        x, qweight, scales, zeros, out, ws, arrivals, m, n, k, split_k, x.stride(0), qweight.stride(0),
        scales.stride(0), out.stride(0), GROUP_SIZE=group_size if group_size < k else triton.next_power_of_2(k),
        MAGIC=magic, MAGIC_VALUE=magic_value, BLOCK_N=config.block_n, BLOCK_M=block_m, SPLITS=splits,
        PERMUTED_X=config.permute_x, num_warps=config.num_warps, num_stages=config.num_stages)
    return out.to(x.dtype)
