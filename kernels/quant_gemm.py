"""Weight-only quantized products x[M, K] @ W[K, N] with W stored as 4- or 8-bit integers.

Layout: GPTQ's (int_packing), act-order rows pre-permuted at load so the hot loop has no gather.
The Triton kernels dequantize in registers: a GEMV that streams the packed weight once for
M <= GEMV_MAX_ROWS (batch-1 decode is bound by reading it) and a tiled tl.dot GEMM for small M; int4 may
take the tensor-core product instead (quant_gemv_mma) wherever start-up timing's row plan chose it (up to its
last bucket). Otherwise, from DEQUANT_MIN_ROWS rows on, the weight is dequantized into a shared bf16/fp16
scratch matrix and multiplied by cuBLAS: measured on an H100, our fused tl.dot tiles ran at a quarter of
cuBLAS's rate there, while dequantizing costs one read of the packed weight and one write plus read of the
dense one.
"""

import struct

import torch

from ._triton import next_power_of_2, tl, triton, use_triton
from .int_packing import check_packed_operands, dequantize_int_rows, per_int32
from .quant_gemv_mma import MmaGemvConfig, quant_gemm_mma
from .split_k import MIN_TILE, split_output, store_split

GEMV_MAX_ROWS = 4
DEQUANT_MIN_ROWS = 48

# GEMM tiles by M, the first row whose max_m >= M:
# (max_m, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, COMPACT).
# Small M is memory-bound (narrow N tiles for more programs); large M is H100 tensor-core shaped.
# COMPACT loads each int32 once and repeats it over its rows in registers (tl.reshape) instead of
# loading it once per row from L1: 1/8 of the load traffic for int4.
QUANT_GEMM_CONFIGS = (
    (16, 16, 64, 128, 8, 4, 4, False),
    # Two stages where a 128-deep K tile meets 32-wide groups: more need over 228 KiB of shared memory.
    (32, 32, 64, 128, 8, 4, 2, False),
    (64, 64, 64, 128, 8, 4, 2, False),
    (128, 64, 128, 64, 8, 4, 2, False),
    (None, 128, 128, 64, 8, 8, 2, False),
)
# GEMV: (BLOCK_N, BLOCK_KP packed rows per step, SPLIT_K, warps, stages, REDUCE). SPLIT_K > 1 is worth it
# only where N / BLOCK_N leaves SMs idle; its K-splits meet by fp32 atomics either in the output (REDUCE
# False: a memset before and a cast after, two more kernels) or in a workspace reserved at load (REDUCE
# True: the last split to arrive at a column tile stores it, one kernel in all).
# BLOCK_KP * 32 // bits dividing the group size: one row of scales per step, not a gathered tile.
QUANT_GEMV_CONFIGS = ((16, 64, 1, 4, 3, False), (32, 64, 1, 4, 3, False), (32, 32, 1, 4, 4, False),
                      (64, 32, 1, 4, 3, False), (32, 16, 1, 4, 4, False), (64, 16, 1, 4, 4, False),
                      (16, 64, 2, 4, 3, False), (32, 64, 4, 4, 3, False),
                      (32, 64, 2, 4, 3, True), (32, 64, 4, 4, 3, True), (32, 32, 8, 4, 4, True),
                      (16, 64, 4, 4, 3, True))
# What start-up timing (layers/quantization/packed_int_timing.py) tries per weight shape: the table's choices
# and the one-kernel K-splits, each one Triton compile.
QUANT_GEMV_TIMED = (QUANT_GEMV_CONFIGS[1], QUANT_GEMV_CONFIGS[7], QUANT_GEMV_CONFIGS[8], QUANT_GEMV_CONFIGS[9],
                    QUANT_GEMV_CONFIGS[10])


def _float_bits(value: float) -> int:
    """The fp32 bit pattern of `value`, as the int32 a kernel argument takes."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


def quant_gemm_ref(x, qweight, scales, zeros, group_size, bits):
    """x [M, K] @ dequantized W [K, N] in fp32 (fp64 for fp64 x) -> [M, N] in x's dtype."""
    group_size = check_packed_operands(x, qweight, scales, zeros, group_size, bits)
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = dequantize_int_rows(qweight, scales, zeros, group_size, bits, x.shape[1], compute)
    return (x.to(compute) @ weight).to(x.dtype)


@triton.jit
def _biased_codes(q):
    """Codes in [0, 2**23) as the fp32 2**23 + q exactly, without the quarter-rate integer conversion: with
    exponent bits 0x4B, q becomes the mantissa. (2**23 + q) - (2**23 + z) = q - z exactly for integer z."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _codes_to_float(q):
    """Codes in [0, 2**23) to fp32 exactly (see _biased_codes)."""
    return _biased_codes(q) - 8388608.0


@triton.jit
def _offset_code(packed, J: tl.constexpr, BITS: tl.constexpr, offset_bits):
    """Code J of each int32 as the float 2**BITS + code: the code moved to the top of the mantissa of 2**BITS,
    in one shift and one mask-and-or (no conversion, no subtraction; callers take 2**BITS times the sum of x
    back out once per tile). `offset_bits` is the bit pattern of 2**BITS, a kernel argument so that the
    compiler keeps it in a register and the mask and the OR become one LOP3 (as constants they take two).
    An arithmetic right shift is fine: the mask drops the sign bits."""
    SHIFT: tl.constexpr = 23 - BITS - J * BITS
    if SHIFT > 0:
        moved = packed << SHIFT
    elif SHIFT < 0:
        moved = packed >> -SHIFT
    else:
        moved = packed
    return ((moved & (((1 << BITS) - 1) << (23 - BITS))) | offset_bits).to(tl.float32, bitcast=True)


@triton.jit
def _quant_gemm_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr, ws_ptr, arrivals_ptr, M, N, K, num_splits,
                       stride_xm, stride_qk, stride_sg, stride_om,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                       MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       COMPACT: tl.constexpr, UPCAST_DOT: tl.constexpr, SPLITS: tl.constexpr):
    # Grouped program order: GROUP_M row tiles share each weight column tile while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Split s of num_splits takes a run of whole K tiles (few rows leave too few column tiles to fill the SMs).
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), num_splits)
    k_begin = tl.program_id(1) * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + tiles_per_split * BLOCK_K, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        kn_mask = k_mask[:, None] & n_mask[None, :]
        if COMPACT:  # each int32 loaded once, then repeated over its PER rows
            offs_kp = k0 // PER + tl.arange(0, BLOCK_K // PER)
            words = tl.load(qw_ptr + offs_kp[:, None] * stride_qk + offs_n[None, :],
                            mask=(offs_kp < K // PER)[:, None] & n_mask[None, :], other=0)
            repeated = tl.broadcast_to(words[:, None, :], (BLOCK_K // PER, PER, BLOCK_N))
            packed = tl.reshape(repeated, (BLOCK_K, BLOCK_N))
        else:  # each int32 loaded once per row it holds (L1 hits)
            packed = tl.load(qw_ptr + (offs_k // PER)[:, None] * stride_qk + offs_n[None, :],
                             mask=kn_mask, other=0)
        # Dequantized in fp32 (exact up to the one rounding to x's dtype for tl.dot).
        q = _codes_to_float((packed >> ((offs_k % PER) * BITS)[:, None]) & MASK)
        if GROUP_SIZE % BLOCK_K == 0:  # the whole K tile lies in one group
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + group * stride_sg + offs_n, mask=n_mask,
                            other=0.0).to(tl.float32)
            zero = tl.load(zeros_ptr + group * stride_sg + offs_n, mask=n_mask,
                           other=0.0).to(tl.float32)
            w = q * scale[None, :] - (zero * scale)[None, :]  # one FMA per code
        else:
            group_offs = (offs_k // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
            scale = tl.load(scales_ptr + group_offs, mask=kn_mask, other=0.0)
            zero = tl.load(zeros_ptr + group_offs, mask=kn_mask, other=0.0)
            w = (q - zero.to(tl.float32)) * scale.to(tl.float32)
        if UPCAST_DOT:
            acc = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    ws_ptrs = ws_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    store_split(acc, out_ptrs, ws_ptrs, m_mask[:, None] & n_mask[None, :], arrivals_ptr, pid, num_splits, SPLITS,
                BLOCK_M, BLOCK_N)


@triton.jit
def _quant_gemv_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr, ws_ptr, arrivals_ptr, M, N, K, offset_bits,
                       stride_xm, stride_qk, stride_sg, stride_om,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_KP: tl.constexpr, SPLIT_K: tl.constexpr,
                       ONE_GROUP: tl.constexpr, SPLITS: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    packed_rows = K // PER
    rows_per_split = tl.cdiv(tl.cdiv(packed_rows, BLOCK_KP), SPLIT_K) * BLOCK_KP
    first_row = tl.program_id(1) * rows_per_split
    end_row = tl.minimum(first_row + rows_per_split, packed_rows)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_rows = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)  # BLOCK_M == 1: per packed row until the end
    for row0 in range(first_row, end_row, BLOCK_KP):  # a tile starts inside K: its group exists
        offs_kp = row0 + tl.arange(0, BLOCK_KP)
        kp_mask = offs_kp < packed_rows
        kpn_mask = kp_mask[:, None] & n_mask[None, :]
        packed = tl.load(qw_ptr + offs_kp[:, None] * stride_qk + offs_n[None, :], mask=kpn_mask,
                         other=0)
        if ONE_GROUP:  # the whole tile lies in one group: one row of scales and zeros
            group_offs = row0 * PER // GROUP_SIZE * stride_sg + offs_n
            group_mask = n_mask
        else:
            group_offs = (offs_kp * PER // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
            group_mask = kpn_mask
        scale = tl.load(scales_ptr + group_offs, mask=group_mask, other=0.0).to(tl.float32)
        # The codes come as 2**BITS + q (_offset_code), so the zero point is taken as 2**BITS + z:
        # sum_k x (q - z) s = s * (sum_k x (2**BITS + q) - (2**BITS + z) * sum_k x) over the PER rows of one
        # int32, which share a group (GROUP_SIZE is a multiple of PER): one scale multiply per packed int32.
        zero = tl.load(zeros_ptr + group_offs, mask=group_mask, other=0.0).to(tl.float32) + (1 << BITS)
        if BLOCK_M == 1:  # batch-1 decode: 2-D tiles, summed over K once after the loop (no shuffles inside)
            x_dot_q = tl.zeros((BLOCK_KP, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_KP,), dtype=tl.float32)
            for j in tl.static_range(PER):
                x = tl.load(x_ptr + offs_kp * PER + j, mask=kp_mask, other=0.0).to(tl.float32)
                x_dot_q += x[:, None] * _offset_code(packed, j, BITS, offset_bits)
                x_sum += x
            if ONE_GROUP:
                acc_rows += scale[None, :] * (x_dot_q - zero[None, :] * x_sum[:, None])
            else:
                acc_rows += scale * (x_dot_q - zero * x_sum[:, None])
        else:  # a few rows share each dequantized code: [BLOCK_M, BLOCK_KP, BLOCK_N] tiles
            x_dot_q = tl.zeros((BLOCK_M, BLOCK_KP, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M, BLOCK_KP), dtype=tl.float32)
            for j in tl.static_range(PER):
                x = tl.load(x_rows + (offs_kp * PER + j)[None, :],
                            mask=m_mask[:, None] & kp_mask[None, :], other=0.0).to(tl.float32)
                q = _offset_code(packed, j, BITS, offset_bits)
                x_dot_q += x[:, :, None] * q[None, :, :]
                x_sum += x
            if ONE_GROUP:
                x_total = tl.sum(x_sum, axis=1)[:, None]
                acc += scale[None, :] * (tl.sum(x_dot_q, axis=1) - zero[None, :] * x_total)
            else:
                tile = x_dot_q - zero[None, :, :] * x_sum[:, :, None]
                acc += tl.sum(scale[None, :, :] * tile, axis=1)
    if BLOCK_M == 1:
        acc = tl.sum(acc_rows, axis=0)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    ws_ptrs = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
    store_split(acc, out_ptrs, ws_ptrs, out_mask, arrivals_ptr, tl.program_id(0), SPLIT_K, SPLITS, BLOCK_M, BLOCK_N)


@triton.jit
def _dequantize_kernel(qw_ptr, scales_ptr, zeros_ptr, w_ptr, N, K, stride_qk, stride_sg, stride_wk,
                       GROUP_SIZE: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                       MASK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_mask = offs_n < N
    offs_kp = k0 // PER + tl.arange(0, BLOCK_K // PER)
    kp_mask = offs_kp < K // PER
    words = tl.load(qw_ptr + offs_kp[:, None] * stride_qk + offs_n[None, :],
                    mask=kp_mask[:, None] & n_mask[None, :], other=0)
    codes = words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]
    q = _codes_to_float(tl.reshape(codes, (BLOCK_K, BLOCK_N)) & MASK)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    group_offs = (offs_k // GROUP_SIZE)[:, None] * stride_sg + offs_n[None, :]
    mask = k_mask[:, None] & n_mask[None, :]
    scale = tl.load(scales_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group_offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + offs_n[None, :],
             ((q - zero) * scale).to(w_ptr.dtype.element_ty), mask=mask)


_scratch: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def reserve_dequant_scratch(numel: int, dtype: torch.dtype, device: torch.device) -> None:
    """Grows the one scratch matrix every layer dequantizes into (the GPU runs them one at a time) to
    hold `numel` values. Called at load time, so that CUDA-graph capture never allocates it."""
    key = (torch.device(device), dtype)
    if key not in _scratch or _scratch[key].numel() < numel:
        _scratch[key] = torch.empty(numel, dtype=dtype, device=device)


def dequant_scratch(dtype: torch.dtype, device: torch.device, numel: int) -> torch.Tensor | None:
    """The scratch reserved for `dtype` on `device` if it holds `numel` values, else None."""
    scratch = _scratch.get((torch.device(device), dtype))
    return scratch if scratch is not None and scratch.numel() >= numel else None


def dequantize_triton(qweight, scales, zeros, group_size, bits, k, out):
    """W [K, N] = (q - zeros) * scales into `out` (K * N values of the weight's float dtype)."""
    per = per_int32(bits)
    n = qweight.shape[1]
    block_k, block_n = 64, 64
    weight = out[:k * n].view(k, n)
    group_size = _kernel_group_size(group_size, k, block_k)
    _dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        qweight, scales, zeros, weight, n, k, qweight.stride(0), scales.stride(0), weight.stride(0),
        GROUP_SIZE=group_size, BITS=bits, PER=per, MASK=(1 << bits) - 1, BLOCK_K=block_k,
        BLOCK_N=block_n, num_warps=4)
    return weight


def _kernel_group_size(group_size: int, k: int, block_k: int) -> int:
    """One group is passed as a power of two >= K, so every tile sees group 0 and loads one row."""
    return max(next_power_of_2(k), block_k) if group_size >= k else group_size


def gemm_table_config(m: int):
    return next(config[1:] for config in QUANT_GEMM_CONFIGS if config[0] is None or m <= config[0])


def gemv_table_config(n: int):
    """32 columns per program; where N / 32 programs leave the H100's SMs idle (every 8B projection
    but the fused gate/up), four K-splits: the fastest in an H100 sweep, atomics and cast included."""
    return QUANT_GEMV_CONFIGS[1] if n >= 16384 else QUANT_GEMV_CONFIGS[7]


def quant_gemm_triton(x, qweight, scales, zeros, group_size, bits, config=None, num_splits=1):
    """Triton version of `quant_gemm_ref` through the tiled GEMM; `config` overrides the table:
    (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, COMPACT). `num_splits` > 1 splits K among
    that many programs per output tile, meeting in the workspace (few rows: too few tiles for the SMs)."""
    group_size = check_packed_operands(x, qweight, scales, zeros, group_size, bits)
    block_m, block_n, block_k, group_m, num_warps, num_stages, compact = (
        config or gemm_table_config(x.shape[0]))
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    num_splits = max(1, min(num_splits, triton.cdiv(k, block_k)))
    if num_splits > 1 and min(block_m, block_n) < MIN_TILE:
        raise ValueError(f"K-splits need tiles of at least {MIN_TILE}x{MIN_TILE}, got {block_m}x{block_n}")
    out, ws, arrivals, splits = split_output(m, n, num_splits, True, x)
    if m == 0 or n == 0:
        return out.to(x.dtype)
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), num_splits)
    _quant_gemm_kernel[grid](
        x, qweight, scales, zeros, out, ws, arrivals, m, n, k, num_splits, x.stride(0), qweight.stride(0),
        scales.stride(0), out.stride(0), GROUP_SIZE=_kernel_group_size(group_size, k, block_k),
        BITS=bits, PER=32 // bits, MASK=(1 << bits) - 1, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_M=group_m, COMPACT=compact,
        # Triton's CPU interpreter multiplies bf16's raw uint16 storage in tl.dot: go through fp32.
        UPCAST_DOT=not x.is_cuda and x.dtype == torch.bfloat16, SPLITS=splits,
        num_warps=num_warps, num_stages=num_stages)
    return out.to(x.dtype)


def quant_gemv_triton(x, qweight, scales, zeros, group_size, bits, config=None):
    """Triton version of `quant_gemm_ref` for M <= GEMV_MAX_ROWS: the packed weight streamed once;
    `config` overrides the choice: (BLOCK_N, BLOCK_KP, SPLIT_K, num_warps, num_stages, REDUCE)."""
    group_size = check_packed_operands(x, qweight, scales, zeros, group_size, bits)
    m, k = x.shape
    if m > GEMV_MAX_ROWS:
        raise ValueError(f"the GEMV takes at most {GEMV_MAX_ROWS} rows, got {m}")
    n = qweight.shape[1]
    block_n, block_kp, split_k, num_warps, num_stages, reduce = config or gemv_table_config(n)
    x = x if x.stride(1) == 1 else x.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    out, ws, arrivals, splits = split_output(m, n, split_k, reduce, x)
    if m == 0 or n == 0:
        return out.to(x.dtype)
    grid = (triton.cdiv(n, block_n), split_k)
    kernel_group_size = _kernel_group_size(group_size, k, block_kp * (32 // bits))
    _quant_gemv_kernel[grid](
        x, qweight, scales, zeros, out, ws, arrivals, m, n, k, _float_bits(1 << bits), x.stride(0),
        qweight.stride(0), scales.stride(0), out.stride(0), GROUP_SIZE=kernel_group_size, BITS=bits,
        PER=32 // bits, BLOCK_M=next_power_of_2(m), BLOCK_N=block_n,
        BLOCK_KP=block_kp, SPLIT_K=split_k,
        ONE_GROUP=kernel_group_size % (block_kp * (32 // bits)) == 0, SPLITS=splits,
        num_warps=num_warps, num_stages=num_stages)
    return out.to(x.dtype)


def quant_gemm(x, qweight, scales, zeros, group_size, bits, gemv_config=None, row_plan=None):
    """CUDA fp16/bf16: for M <= GEMV_MAX_ROWS `gemv_config` (a GEMV tile tuple, or an MmaGemvConfig for the
    tensor-core product; else the table's GEMV); up to the last bucket of `row_plan` (start-up timing's
    ((max_rows, choice), ...): "dequant", an MmaGemvConfig or (GEMM config, num_splits)) its choice; otherwise
    the GEMM below DEQUANT_MIN_ROWS, else dequantize into the scratch reserved at load and cuBLAS. Elsewhere
    the reference."""
    if not use_triton(x) or x.dtype not in (torch.float16, torch.bfloat16):
        return quant_gemm_ref(x, qweight, scales, zeros, group_size, bits)
    m = x.shape[0]
    if m <= GEMV_MAX_ROWS:
        if isinstance(gemv_config, MmaGemvConfig):
            return quant_gemm_mma(x, qweight, scales, zeros, group_size, bits, gemv_config)
        return quant_gemv_triton(x, qweight, scales, zeros, group_size, bits, gemv_config)
    k, n = x.shape[1], qweight.shape[1]
    choice = None
    if row_plan and m <= row_plan[-1][0]:
        choice = next(choice for max_rows, choice in row_plan if m <= max_rows)
        if isinstance(choice, MmaGemvConfig):
            return quant_gemm_mma(x, qweight, scales, zeros, group_size, bits, choice)
        if choice != "dequant":
            return quant_gemm_triton(x, qweight, scales, zeros, group_size, bits, *choice)
    scratch = dequant_scratch(x.dtype, x.device, k * n)
    if scratch is None or (choice is None and m < DEQUANT_MIN_ROWS):
        return quant_gemm_triton(x, qweight, scales, zeros, group_size, bits)
    check_packed_operands(x, qweight, scales, zeros, group_size, bits)
    return x @ dequantize_triton(qweight, scales, zeros, group_size, bits, k, scratch)
