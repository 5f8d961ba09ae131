"""Phi-3's LongRoPE (SuRoPE): rotary frequencies stretched per dimension by a short or a long factor
set, each table scaled by the attention factor, chosen per token as transformers chooses them.

transformers rotates a sequence with the long set once it holds more than
`original_max_position_embeddings` tokens, the short one before; when a sequence grows past that length,
its generate() drops the KV cache and recomputes it whole with the long set (the scheduler does the same,
see SchedulerConfig.recompute_kv_at). So each token here takes the set of its sequence's current length.
Both tables live in one cache ([short rows; long rows]): each token reads its own row.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from asyncserve.errors import UnsupportedModelError
from asyncserve.kernels import rotary_embedding
from asyncserve.layers.attention import AttentionMetadata


def _cos_sin(inv_freq: torch.Tensor, max_position: int, scale: float) -> torch.Tensor:
    freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv_freq[None, :]  # [P, R/2]
    return torch.cat([freqs.cos() * scale, freqs.sin() * scale], dim=-1)                   # [P, R]


class PhiRotaryEmbedding(nn.Module):
    """Neox-style rotary over the first `rotary_dim` dims of each head; plain or LongRoPE (rope_type
    "longrope", or "su" in older configs)."""

    def __init__(self, head_dim: int, rotary_dim: int, max_position: int, theta: float, scaling: dict,
                 original_max_position: int | None):
        super().__init__()
        self.head_dim = head_dim
        self.max_position = max_position
        rope_type = scaling.get("rope_type", "default")
        shape = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
        if rope_type in ("default", None):
            self.original_max_position = None
            table = _cos_sin(1.0 / (theta ** shape), max_position, 1.0)
        elif rope_type in ("longrope", "su"):
            original = original_max_position or scaling["original_max_position_embeddings"]
            self.original_max_position = original
            factor = scaling.get("factor") or max_position / original
            scale = scaling.get("attention_factor")
            if scale is None:
                scale = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            tables = []
            for key in ("short_factor", "long_factor"):
                ext = torch.tensor(scaling[key], dtype=torch.float32)
                tables.append(_cos_sin(1.0 / (ext * theta ** shape), max_position, scale))
            table = torch.cat(tables)                                  # [2P, R]: short rows, then long
        else:
            raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported for Phi-3 "
                                        "(default and longrope/su are).")
        self.register_buffer("cos_sin_cache", table, persistent=False)

    def cache_rows(self, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """[T] positions -> [T] rows of the cache: once per forward, shared by every layer."""
        original = self.original_max_position
        if original is None:
            return positions
        if meta.context_lens is None:  # a captured decode step: each sequence holds position + 1 tokens
            long = positions >= original
        else:
            counts = meta.query_start_loc.diff()
            long = meta.context_lens.repeat_interleave(counts, output_size=positions.shape[0]) > original
        return positions + long.to(positions.dtype) * self.max_position

    is_neox_style = True

    def forward(self, rows: torch.Tensor, query: torch.Tensor, key: torch.Tensor):
        """q [T, H*D], k [T, Hkv*D] rotated in place at `cache_rows`."""
        num_tokens = query.shape[0]
        return rotary_embedding(rows, query.view(num_tokens, -1, self.head_dim),
                                key.view(num_tokens, -1, self.head_dim), self.cos_sin_cache, True)

    def fused_table(self, rows: torch.Tensor) -> torch.Tensor:
        """PagedAttention rotates with this table in its cache-write launch: `rows` (from `cache_rows`) index
        it as positions index a plain rotary's, the short or long set chosen already."""
        return self.cos_sin_cache
