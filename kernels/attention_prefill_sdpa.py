"""Prefill of one sequence through torch's own fused attention (FlashAttention-2 or cuDNN, built into
torch): the sequence's blocks are gathered into contiguous K/V, then attended causally, aligned
lower-right so a chunk sees its cached context. Only for the long-prompt case it serves (one
sequence, no window, softcap or sinks, a model-dtype pool, bf16/fp16 on CUDA); `sdpa_prefill_applies` says
when, and the Triton kernel runs otherwise. Off unless `ASYNCSERVE_PREFILL_KERNEL=sdpa`
(scripts/bench_prefill_attention.py measures whether it pays)."""

import torch
import torch.nn.functional as F


def sdpa_prefill_applies(query, k_cache, query_start_loc, max_query_len, k_scale=1.0, v_scale=1.0, *,
                         sliding_window=None, softcap=None, sinks=None) -> bool:
    """One sequence whose new tokens are the whole query, in a pool of the query's half dtype."""
    return (query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and k_cache.dtype == query.dtype and query_start_loc.shape[0] == 2
            and query.shape[0] == max_query_len and not sliding_window and not softcap and sinks is None
            and hasattr(torch.ops.aten, "_flash_attention_forward"))


def _gather(cache, block_table, seq_len):
    """cache [N, bs, Hkv, D] -> the sequence's [seq_len, Hkv, D], contiguous."""
    num_blocks = -(-seq_len // cache.shape[1])
    return cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]


def paged_prefill_attention_sdpa(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                 max_query_len, max_seq_len, scale, k_scale=1.0, v_scale=1.0, *,
                                 sliding_window=None, softcap=None, sinks=None, backend="flash"):
    """query [T, H, D] of one sequence whose length is max_seq_len -> out [T, H, D].
    `backend` "cudnn" takes torch's cuDNN attention when the chunk is the whole sequence (T == L)."""
    num_tokens = query.shape[0]
    keys = _gather(k_cache, block_tables[0], max_seq_len)  # [L, Hkv, D]
    values = _gather(v_cache, block_tables[0], max_seq_len)
    if backend == "cudnn" and num_tokens == max_seq_len:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        group = query.shape[1] // keys.shape[1]
        q = query.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
        k = keys.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        v = values.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return out[0].transpose(0, 1)
    cu_seq_q = query_start_loc.to(torch.int32)
    cu_seq_k = F.pad(seq_lens[:1].to(torch.int32), (1, 0))  # [0, L], on the device
    # FlashAttention's causal mask with fewer queries than keys is aligned to the bottom right.
    out = torch.ops.aten._flash_attention_forward(
        query, keys, values, cu_seq_q, cu_seq_k, max_query_len, max_seq_len, 0.0, True, False,
        scale=scale)[0]
    return out
