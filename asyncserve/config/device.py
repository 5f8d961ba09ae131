"""Which device and dtype a model runs in: the user's names (vLLM's and torch's spellings) resolved against
the machine and the checkpoint. torch is imported only here, when a dtype or device is resolved."""
from __future__ import annotations

from typing import TYPE_CHECKING

from asyncserve.errors import ConfigError

if TYPE_CHECKING:
    import torch

# Every dtype name a user may give (vLLM's and torch's spellings) -> the torch dtype's name.
DTYPE_NAMES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}


def resolve_device(device: str) -> "torch.device":
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA device.")
    return torch.device(device)


def resolve_dtype(dtype: str, checkpoint_dtype: "torch.dtype | None", device: "torch.device") -> "torch.dtype":
    """'auto' keeps a half-precision checkpoint's dtype on GPU, bf16 for fp32 ones, fp32 on CPU."""
    import torch
    if dtype != "auto":
        return getattr(torch, DTYPE_NAMES[dtype])
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16
