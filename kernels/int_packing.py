"""GPTQ's packed integer layout: packing, unpacking, the checks every packed product makes, the float weight.

`qweight` int32 [K * bits // 32, N] packs 32 // bits consecutive K-rows per int32, lowest bits first;
W[k, n] = (q[k, n] - zeros[k // g, n]) * scales[k // g, n], `zeros` in the integer domain (act-order rows are
pre-permuted at load, so no product gathers).
"""

import torch

QUANT_BITS = (4, 8)


def per_int32(bits: int) -> int:
    if bits not in QUANT_BITS:
        raise ValueError(f"quantized weights must have 4 or 8 bits, not {bits}")
    return 32 // bits


def pack_int_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] integers in [0, 2**bits) -> int32 [K * bits // 32, N], 32 // bits rows per int32."""
    per = per_int32(bits)
    num_rows, num_cols = q.shape
    if num_rows % per:
        raise ValueError(f"K={num_rows} must be a multiple of {per} to pack {bits}-bit rows")
    if q.numel() and (q.min() < 0 or q.max() >= 1 << bits):
        raise ValueError(f"values to pack must lie in [0, {1 << bits})")
    shifts = torch.arange(per, device=q.device, dtype=torch.int64) * bits
    rows = q.to(torch.int64).reshape(num_rows // per, per, num_cols)
    words = (rows << shifts[None, :, None]).sum(1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int_rows(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """int32 [K * bits // 32, N] -> int32 [K, N]: the inverse of `pack_int_rows`."""
    per = per_int32(bits)
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * per != k:
        raise ValueError(f"qweight must be int32 [{k} * {bits} // 32, N], "
                         f"got {qweight.dtype} {list(qweight.shape)}")
    shifts = torch.arange(per, device=qweight.device, dtype=torch.int32) * bits
    q = (qweight[:, None, :] >> shifts[None, :, None]) & ((1 << bits) - 1)
    return q.reshape(k, qweight.shape[1])


def check_packed_operands(x, qweight, scales, zeros, group_size, bits) -> int:
    """Validates shapes and dtypes; returns the effective group size (K for one group)."""
    per = per_int32(bits)
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], got {list(x.shape)}")
    k = x.shape[1]
    group_size = k if group_size == -1 or group_size >= k else group_size  # one group
    if group_size <= 0 or group_size % per:
        raise ValueError(f"group_size {group_size} must be K ({k}), -1 or a positive multiple "
                         f"of {per}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2 or qweight.shape[0] * per != k:
        raise ValueError(f"qweight must be int32 [{k} * {bits} // 32, N], "
                         f"got {qweight.dtype} {list(qweight.shape)}")
    groups_shape = (-(-k // group_size), qweight.shape[1])
    for name, tensor in (("scales", scales), ("zeros", zeros)):
        if tuple(tensor.shape) != groups_shape or tensor.dtype != x.dtype:
            raise ValueError(f"{name} must be {x.dtype} {list(groups_shape)}, "
                             f"got {tensor.dtype} {list(tensor.shape)}")
    return group_size


def dequantize_int_rows(qweight, scales, zeros, group_size, bits, k, dtype=torch.float32):
    """The float weight W [K, N] = (q - zeros[group]) * scales[group], in fp32 (or fp64)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    group_size = k if group_size == -1 or group_size >= k else group_size
    group = torch.arange(k, device=qweight.device) // group_size
    q = unpack_int_rows(qweight, bits, k).to(compute)
    return ((q - zeros.to(compute)[group]) * scales.to(compute)[group]).to(dtype)


