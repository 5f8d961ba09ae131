"""FP8 KV cache arithmetic shared by the cache write and the attention kernels.

Per-tensor scales per layer: a key is stored as saturate(k / k_scale) in e4m3 (one byte, so the same
memory holds twice the bf16 tokens) and read back as stored * k_scale; values likewise with v_scale.
A scale of 1.0 costs nothing; a tensor scale is read on the device, so CUDA graphs replay it.
"""

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_KV_MAX = torch.finfo(FP8_KV_DTYPE).max  # 448: larger magnitudes saturate


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_KV_DTYPE


def _is_one(scale) -> bool:
    return not isinstance(scale, torch.Tensor) and scale == 1.0


def quantize_kv_ref(x: torch.Tensor, scale, dtype: torch.dtype) -> torch.Tensor:
    """New keys or values -> the pool's dtype: divided by the scale, saturated to e4m3's range if fp8."""
    if is_fp8(dtype):
        return (x.float() / scale).clamp(-FP8_KV_MAX, FP8_KV_MAX).to(dtype)
    if not _is_one(scale):
        x = x.float() / scale
    return x.to(dtype)


def dequantize_kv_ref(stored: torch.Tensor, scale) -> torch.Tensor:
    """Keys or values read from the pool -> fp32 values."""
    stored = stored.float()
    return stored if _is_one(scale) else stored * scale


def scale_operands(k_scale, v_scale, like: torch.Tensor):
    """(k_scale, v_scale, HAS_SCALES) for a Triton launch: fp32 one-element tensors on `like`'s device,
    or `like` itself as an unread placeholder when both scales are 1.0."""
    if _is_one(k_scale) and _is_one(v_scale):
        return like, like, False
    return _scale_tensor(k_scale, like.device), _scale_tensor(v_scale, like.device), True


def _scale_tensor(scale, device: torch.device) -> torch.Tensor:
    if isinstance(scale, torch.Tensor):
        return scale.to(device=device, dtype=torch.float32)
    return torch.tensor(float(scale), dtype=torch.float32, device=device)
