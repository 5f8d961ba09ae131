"""Paged decode attention on the CPU: each sequence's keys and values gathered once, then torch's fused
scaled_dot_product_attention (its flash-attention kernel for the CPU).

The reference spends a dozen ops per layer on gathering, masking and normalising; on a CPU every op
costs microseconds of dispatch, and those past a size fork and join the intra-op threads, which stall
whenever another process holds a core. Here a batch-1 decode takes two gathers and one fused kernel,
and needs no mask: it attends over exactly the sequence's (or its window's) keys. Same contract as
`paged_decode_attention_ref`, which stays the oracle; a softcap or KV scales (an fp8 pool) take the
reference. Attention sinks need each row's log-sum-exp, which the public fused op does not return: its
CPU flash kernel does (`_scaled_dot_product_flash_attention_for_cpu`, the query heads of a KV head as its
rows), and a row's output is then scaled by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink).
"""

import torch
from torch.nn import functional as F

from .attention_ref import paged_decode_attention_ref
from .kv_scale import _is_one, is_fp8

# torch's CPU flash-attention kernel, which returns each row's log-sum-exp beside the output.
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, scale,
                               max_seq_len=None, k_scale=1.0, v_scale=1.0, *, sliding_window=None,
                               softcap=None, sinks=None):
    """query [B, H, D] (one new token per sequence, already in the pool) -> out [B, H, D]."""
    if (softcap or is_fp8(k_cache.dtype) or not (_is_one(k_scale) and _is_one(v_scale))
            or (sinks is not None and _FLASH_WITH_LSE is None)):
        return paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, scale,
                                          max_seq_len, k_scale, v_scale, sliding_window=sliding_window,
                                          softcap=softcap, sinks=sinks)
    num_seqs, _, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    longest = int(seq_lens.max()) if num_seqs else 0
    if longest == 0:
        return torch.zeros_like(query)
    num_blocks = -(-longest // block_size)
    tables = block_tables[:, :num_blocks]
    if num_seqs > 1:  # entries past a sequence's length may hold anything: read block 0 there instead
        block_starts = torch.arange(num_blocks, device=query.device) * block_size
        tables = torch.where(block_starts < seq_lens[:, None], tables, 0)
    flat_tables = tables.reshape(-1)
    shape = (num_seqs, num_blocks * block_size, num_kv_heads, head_dim)
    keys = k_cache.index_select(0, flat_tables).view(shape)  # [B, L, Hkv, D]
    values = v_cache.index_select(0, flat_tables).view(shape)
    hidden = None
    if num_seqs == 1:  # exactly the keys it sees: no mask
        first = max(0, longest - sliding_window) if sliding_window else 0
        keys, values = keys[:, first:longest], values[:, first:longest]
    else:
        positions = torch.arange(shape[1], device=query.device)[None, :]
        lengths = seq_lens[:, None].long()
        hidden = positions >= lengths
        if sliding_window:  # the new token sits at seq_len - 1
            hidden |= positions <= lengths - 1 - sliding_window
        # Stale slots may hold NaN, which a zero probability would still spread: zero those rows only.
        hidden_rows = hidden.view(-1).nonzero().view(-1)
        keys.view(-1, num_kv_heads * head_dim).index_fill_(0, hidden_rows, 0.0)
        values.view(-1, num_kv_heads * head_dim).index_fill_(0, hidden_rows, 0.0)
    k, v = keys.transpose(1, 2), values.transpose(1, 2)  # [B, Hkv, L, D]
    if query.dtype != torch.float32:  # softmax and sums in fp32, as the reference
        k, v = k.float(), v.float()
    if sinks is None:
        mask = None if hidden is None else ~hidden[:, None, None, :]  # [B, 1, 1, L]: True where a key is seen
        q = query[:, :, None].float()  # [B, H, 1, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)[:, :, 0]
    else:
        out = _attend_with_sinks(query.float(), k, v, hidden, scale, sinks)
    if hidden is not None:
        out = out.masked_fill((seq_lens == 0)[:, None, None], 0.0)  # empty sequences -> zeros
    return out.to(query.dtype)


def _attend_with_sinks(query, keys, values, hidden, scale, sinks):
    """query [B, H, D], keys/values [B, Hkv, L, D] fp32, hidden [B, L] (or None: every key seen) ->
    [B, H, D]: each KV head's query heads are the rows of one fused call, rescaled by their sinks."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    q = query.view(num_seqs, num_kv_heads, group, head_dim)
    mask = None
    if hidden is not None:  # the flash kernel takes an additive mask of the query's dtype only
        mask = torch.zeros(hidden.shape, dtype=q.dtype).masked_fill_(hidden, float("-inf"))[:, None, None, :]
    out, logsumexp = _FLASH_WITH_LSE(q, keys, values, 0.0, False, attn_mask=mask, scale=scale)
    out = out * torch.sigmoid(logsumexp - sinks.float().view(num_kv_heads, group))[..., None]
    return out.reshape(num_seqs, num_heads, head_dim)
