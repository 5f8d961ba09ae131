"""Attention over the paged KV pool; the step's metadata is passed in, never read from globals."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from asyncserve.kernels import paged_attention, paged_decode_attention, write_kv_cache


@dataclass
class AttentionMetadata:
    """Where this step's tokens live in the pool and what each one may attend to."""

    slot_mapping: torch.Tensor     # [T] int64: pool slot of each new token (-1: padding)
    block_tables: torch.Tensor     # [B, max_blocks] int32
    seq_lens: torch.Tensor         # [B] int32: context length including the new tokens
    query_start_loc: torch.Tensor  # [B + 1] int32: offsets of each sequence's new tokens
    max_query_len: int
    max_seq_len: int
    # Mixed steps: the leading `num_decodes` sequences have one new token each and take the decode
    # kernel; the rest take the prefill kernel with these offsets (query_start_loc shifted to 0).
    num_decodes: int = 0
    prefill_query_start_loc: torch.Tensor | None = None
    prefill_seq_lens: torch.Tensor | None = None
    prefill_block_tables: torch.Tensor | None = None
    decode_max_seq_len: int = 0
    prefill_max_seq_len: int = 0
    # [B] int32: how many tokens each sequence holds (prompt and output so far; more than seq_lens while
    # a prefill is chunked), for rotary schemes that depend on it (Phi-3's LongRoPE). None in captured
    # decode steps, where it equals seq_lens.
    context_lens: torch.Tensor | None = None

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


class PagedAttention(nn.Module):
    """Writes the new K/V into the pool, then attends over each sequence's whole context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]; bound by the runner.
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_dim)
        key = key.view(num_tokens, self.num_kv_heads, self.head_dim)
        value = value.view(num_tokens, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = self.kv_cache
        write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            out = paged_decode_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                         self.scale, meta.max_seq_len)
        elif meta.num_decodes:
            decodes = meta.num_decodes
            out = torch.empty_like(query)
            out[:decodes] = paged_decode_attention(
                query[:decodes], k_cache, v_cache, meta.block_tables[:decodes], meta.seq_lens[:decodes],
                self.scale, meta.decode_max_seq_len)
            out[decodes:] = paged_attention(
                query[decodes:], k_cache, v_cache, meta.prefill_block_tables, meta.prefill_seq_lens,
                meta.prefill_query_start_loc, meta.max_query_len, meta.prefill_max_seq_len, self.scale)
        else:
            out = paged_attention(query, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                  meta.query_start_loc, meta.max_query_len, meta.max_seq_len, self.scale)
        return out.reshape(num_tokens, self.num_heads * self.head_dim)
