"""Pure-torch paged attention: the CPU path of the engine and the oracle of the Triton kernels.

Sequence b has `q_len_b` new tokens (its slice of the flattened query) and `seq_lens[b]`
tokens in the pool, new ones included; new token j sits at position
`seq_lens[b] - q_len_b + j` and sees positions 0..itself. Softmax runs in fp32.
A sequence of length 0 (CUDA-graph padding) yields zeros. An fp8 pool is read as stored * scale.

Options of every entry point (keywords, off by default):
- `sliding_window` W: a query at position p sees only keys in (p - W, p], the convention of
  transformers' sliding-window mask (Mistral, Gemma 2/3): W keys, itself included.
- `softcap` C: scores s become C * tanh(s / C) before masking and softmax (Gemma 2).
- `sinks` [H]: a learned logit per query head that joins each softmax's denominator and nothing else
  (GPT-OSS's attention sinks): weights become exp(s_i) / (exp(sink) + sum_j exp(s_j)), so a head may
  attend to less than all of its keys. A query that sees no key (an empty sequence) still gives zeros.
- `key_ends` [T] (prefill only): each query row sees keys at positions below its entry instead of up to
  itself, so a span of tokens may attend both ways (Gemma 3's image tokens: each one's entry is its image's
  end; every other row's is its position + 1). The keys must be in the pool, so the span's end lies in the
  step. A sliding window still counts back from the query's own position. The Triton prefill kernels take
  it too (HAS_KEY_ENDS); a step of lone new tokens drops it (each one's end is its position + 1).
"""

import torch

from .kv_scale import dequantize_kv_ref

# Bounds the fp32 scores of one chunk of queries (elements) so long prompts fit in memory.
_MAX_SCORE_ELEMENTS = 1 << 26


def _gather_context(cache, block_table, seq_len, scale=1.0):
    """cache [N, bs, Hkv, D], block_table [max_blocks] -> the sequence's [seq_len, Hkv, D], fp32."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    blocks = block_table[:num_blocks].long()
    return dequantize_kv_ref(cache[blocks].flatten(0, 1)[:seq_len], scale)


def _soft_cap(scores, softcap):
    """C * tanh(s / C), in place: Gemma 2's bound on attention logits."""
    return scores.div_(softcap).tanh_().mul_(softcap)


def _softmax(scores, sink=None):
    """Softmax over the last dim of scores; `sink` (each row's sink logit, broadcastable to
    scores[..., :1]) joins the denominator as one more key whose weight is dropped."""
    if sink is None:
        return torch.softmax(scores, dim=-1)
    sink = sink.float().expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def paged_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                        max_query_len, max_seq_len, scale, k_scale=1.0, v_scale=1.0, *,
                        sliding_window=None, softcap=None, sinks=None, key_ends=None):
    """query [T, H, D] (flattened new tokens) -> out [T, H, D]; causal over the paged pool."""
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(query)
    starts = query_start_loc.tolist()
    lengths = seq_lens.tolist()
    for seq, seq_len in enumerate(lengths):
        q_start, q_end = starts[seq], starts[seq + 1]
        if q_end == q_start or seq_len == 0:
            continue
        keys = _gather_context(k_cache, block_tables[seq], seq_len, k_scale)  # [L, Hkv, D]
        values = _gather_context(v_cache, block_tables[seq], seq_len, v_scale)
        key_positions = torch.arange(seq_len, device=query.device)
        context_len = seq_len - (q_end - q_start)
        chunk = max(1, _MAX_SCORE_ELEMENTS // (num_heads * seq_len))
        for chunk_start in range(q_start, q_end, chunk):
            chunk_end = min(chunk_start + chunk, q_end)
            q = query[chunk_start:chunk_end].float().reshape(-1, num_kv_heads, group, head_dim)
            scores = torch.einsum("tkgd,lkd->kgtl", q, keys) * scale  # [Hkv, group, t, L]
            if softcap:
                _soft_cap(scores, softcap)
            query_positions = context_len + torch.arange(
                chunk_start - q_start, chunk_end - q_start, device=query.device)
            if key_ends is None:
                hidden = key_positions[None, :] > query_positions[:, None]  # [t, L]
            else:
                hidden = key_positions[None, :] >= key_ends[chunk_start:chunk_end, None].to(key_positions.device)
            if sliding_window:
                hidden |= key_positions[None, :] <= query_positions[:, None] - sliding_window
            scores.masked_fill_(hidden, float("-inf"))
            probs = _softmax(scores, None if sinks is None else sinks.view(num_kv_heads, group, 1, 1))
            attended = torch.einsum("kgtl,lkd->tkgd", probs, values)  # [t, Hkv, group, D]
            out[chunk_start:chunk_end] = attended.reshape(-1, num_heads, head_dim).to(query.dtype)
    return out


paged_prefill_attention_ref = paged_attention_ref


def paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, scale,
                               max_seq_len=None, k_scale=1.0, v_scale=1.0, *, sliding_window=None,
                               softcap=None, sinks=None):
    """query [B, H, D] (one new token per sequence, already in the pool) -> out [B, H, D].

    Batched over sequences: gathers every sequence's blocks up to the longest one.
    """
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    longest = int(seq_lens.max()) if num_seqs else 0
    if longest == 0:
        return torch.zeros_like(query)
    num_blocks = -(-longest // block_size)
    block_positions = torch.arange(num_blocks, device=query.device) * block_size
    # Table entries past a sequence's length may hold anything: read block 0 there instead.
    used = block_positions[None, :] < seq_lens[:, None].long()  # [B, nb]
    blocks = torch.where(used, block_tables[:, :num_blocks].long(), 0)
    keys = dequantize_kv_ref(k_cache[blocks].flatten(1, 2)[:, :longest], k_scale)  # [B, L, Hkv, D]
    values = dequantize_kv_ref(v_cache[blocks].flatten(1, 2)[:, :longest], v_scale)
    q = query.float().reshape(num_seqs, num_kv_heads, group, head_dim)
    scores = torch.einsum("bkgd,blkd->bkgl", q, keys) * scale  # [B, Hkv, group, L]
    if softcap:
        _soft_cap(scores, softcap)
    key_positions = torch.arange(longest, device=query.device)[None, :]
    hidden = key_positions >= seq_lens[:, None].long()
    if sliding_window:  # the new token sits at seq_len - 1
        hidden |= key_positions <= seq_lens[:, None].long() - 1 - sliding_window
    scores.masked_fill_(hidden[:, None, None, :], float("-inf"))
    values.masked_fill_(hidden[:, :, None, None], 0.0)  # stale slots may hold NaN
    sink = None if sinks is None else sinks.view(1, num_kv_heads, group, 1)
    probs = _softmax(scores, sink).nan_to_num_(0.0)  # empty sequences -> zeros
    out = torch.einsum("bkgl,blkd->bkgd", probs, values)
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)
