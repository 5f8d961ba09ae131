"""Entry points of paged attention: pick the decode or prefill kernel, or the torch reference.
Every entry point takes the keywords `sliding_window` and `softcap` (see attention_ref), and `k_scale`,
`v_scale` for an fp8 pool; the prefill ones take `key_ends` (spans attended both ways), which every prefill
kernel but the opt-in torch one ("sdpa", which then defers to v2) supports."""

from ._triton import use_triton
from .attention_cpu import paged_decode_attention_cpu
from .attention_decode import paged_decode_attention_triton
from .attention_prefill import paged_prefill_attention_triton
from .attention_ref import (
    paged_attention_ref,
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
)


def paged_attention_triton(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                           max_query_len, max_seq_len, scale, **options):
    """query [T, H, D] -> out [T, H, D]. A step of only decodes (max_query_len == 1, so
    T == num_seqs) takes the flash-decoding kernel, any other the prefill kernel."""
    if max_query_len == 1:
        # A lone new token's key end is its position + 1 (its span ends in the step): causal.
        options.pop("key_ends", None)
        return paged_decode_attention_triton(query, k_cache, v_cache, block_tables, seq_lens,
                                             scale, max_seq_len, **options)
    return paged_prefill_attention_triton(query, k_cache, v_cache, block_tables, seq_lens,
                                          query_start_loc, max_query_len, max_seq_len, scale,
                                          **options)


def paged_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                    max_query_len, max_seq_len, scale, **options):
    """Triton on CUDA, torch reference elsewhere."""
    triton = use_triton(query)
    attend = paged_attention_triton if triton else paged_attention_ref
    return attend(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                  max_query_len, max_seq_len, scale, **options)


def paged_prefill_attention(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                            max_query_len, max_seq_len, scale, **options):
    """Triton on CUDA, torch reference elsewhere."""
    triton = use_triton(query)
    attend = paged_prefill_attention_triton if triton else paged_prefill_attention_ref
    return attend(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                  max_query_len, max_seq_len, scale, **options)


def paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale,
                           max_seq_len=None, **options):
    """Triton on CUDA, torch's fused attention on the CPU, torch reference elsewhere."""
    if use_triton(query):
        attend = paged_decode_attention_triton
    elif query.device.type == "cpu":
        attend = paged_decode_attention_cpu
    else:
        attend = paged_decode_attention_ref
    return attend(query, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len, **options)
