"""Rotary position embeddings: a cos|sin table per position, with the scalings checkpoints use."""
from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from asyncserve.kernels import rotary_embedding


def rope_parameters(hf_config) -> tuple[float, dict]:
    """(theta, scaling dict) from either transformers 5 `rope_parameters` or 4.x `rope_theta`/`rope_scaling`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    merged = {**scaling, **params}
    merged.setdefault("rope_type", merged.get("type", "default"))
    return float(theta), merged


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """YaRN (GPT-OSS, DeepSeek, Qwen long-context): each frequency blends its extrapolated value (the
    fastest rotations, kept) and its interpolated one (divided by `factor`) by a linear ramp between the
    dimensions that rotate `beta_fast` and `beta_slow` times over the original context, as transformers."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = 1 - ramp
    return inv_freq / factor * (1 - extrapolated) + inv_freq * extrapolated


def rope_attention_factor(scaling: dict) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature (from `factor`, or the config's
    `attention_factor`, or DeepSeek's mscale ratio), 1 for every other rope type."""
    if scaling.get("rope_type") != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, mscale, mscale_all_dim = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
    return _yarn_mscale(factor)


def inverse_frequencies(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    raise NotImplementedError(f"rope_type {rope_type!r} is not supported yet (default, linear, llama3, yarn are).")


# One cos|sin table per distinct rotary (and device), shared by every layer that uses it: a table spans
# max_position_embeddings rows in fp32 (Llama-3.1-8B: 64 MiB), and one per layer was 2 GiB of an 8B model's
# memory that the KV cache could hold. Weak values: the table goes with the last model that holds it.
_TABLES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def cos_sin_table(head_dim: int, max_position: int, theta: float, scaling: dict) -> torch.Tensor:
    """[P, D]: cos of each frequency, then sin (times YaRN's attention factor), fp32 for every model dtype,
    on the default device (the one a model is built on)."""
    key = (head_dim, max_position, theta, repr(sorted(scaling.items())), str(torch.get_default_device()))
    table = _TABLES.get(key)
    if table is None:
        inv_freq = inverse_frequencies(head_dim, theta, scaling)
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :].to(positions.device)  # [P, D/2]
        factor = rope_attention_factor(scaling)
        table = torch.cat([freqs.cos() * factor, freqs.sin() * factor], dim=-1)
        _TABLES[key] = table
    return table


class RotaryEmbedding(nn.Module):
    """Applies rotary embeddings to flattened q [T, H*D] and k [T, Hkv*D] at given positions."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict,
                 is_neox_style: bool = True):
        super().__init__()
        self.head_dim = head_dim
        self.is_neox_style = is_neox_style
        self.register_buffer("cos_sin_cache", cos_sin_table(head_dim, max_position, theta, scaling),
                             persistent=False)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        return rotary_embedding(positions, query, key, self.cos_sin_cache, self.is_neox_style)

    def fused_table(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The cos|sin table that PagedAttention may rotate with in its cache-write launch, or None where
        this rotary must run on its own (M-RoPE's [3, T] positions gather a table per step)."""
        return self.cos_sin_cache if positions.dim() == 1 else None
