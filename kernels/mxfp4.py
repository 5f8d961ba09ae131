"""MXFP4 (the OCP microscaling format GPT-OSS ships its experts in): groups of 32 e2m1 values, two to a
byte (the low nibble first), and one e8m0 scale per group (a biased exponent: 2^(scale - 127)).

asyncserve has no MXFP4 matmul yet (a Hopper path needs its own grouped GEMM; the quantized-kernels work
comes later), so checkpoints are dequantized once, at load, to the model's dtype: the experts then take
the unquantized fused MoE kernel. Every MXFP4 value is exact in bf16 (and fp32), so nothing is rounded.
Pure torch, on the device the packed tensors are on; a load-time conversion, never on the hot path.
"""

import torch

MXFP4_GROUP = 32  # values per scale
# e2m1 codes 0..15: sign bit, two exponent bits, one mantissa bit.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_SCALE_BIAS = 127
_MAX_CHUNK_BYTES = 1 << 26  # packed bytes per chunk: bounds the int32 index temporaries


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [..., G, 16] and scales uint8 [..., G] -> [..., G * 32] values in `dtype`, in the
    order they were packed (value 2i in byte i's low nibble, 2i + 1 in its high one)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales are uint8 tensors, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != MXFP4_GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks of shape {tuple(blocks.shape)} do not fit scales of shape "
                         f"{tuple(scales.shape)}: expected blocks [..., G, 16] and scales [..., G]")
    lut = torch.tensor(FP4_E2M1_VALUES, dtype=dtype, device=blocks.device)
    flat_blocks = blocks.reshape(-1, MXFP4_GROUP // 2)                 # [groups, 16]
    exponents = scales.reshape(-1, 1).to(torch.int32) - _SCALE_BIAS   # [groups, 1]
    out = torch.empty(flat_blocks.shape[0], MXFP4_GROUP, dtype=dtype, device=blocks.device)
    chunk = max(1, _MAX_CHUNK_BYTES // (MXFP4_GROUP // 2))
    for start in range(0, flat_blocks.shape[0], chunk):
        packed = flat_blocks[start:start + chunk]
        values = out[start:start + chunk]
        values[:, 0::2] = lut[(packed & 0x0F).to(torch.int32)]
        values[:, 1::2] = lut[(packed >> 4).to(torch.int32)]
        torch.ldexp(values, exponents[start:start + chunk], out=values)  # x 2^e: exact
    return out.view(*scales.shape[:-1], scales.shape[-1] * MXFP4_GROUP)
