"""Flash-attention over the paged KV pool for prefill, chunked prefill and extend.

`paged_prefill_attention_triton` runs the kernel `PREFILL_KERNEL` names (env
`ASYNCSERVE_PREFILL_KERNEL`): "v2", the default, packs the query heads of a KV head into each tile
(attention_prefill_gqa); "v1" is this module's per-head kernel, kept as the reference and fallback;
"sdpa" takes torch's fused attention where it applies (attention_prefill_sdpa), else v2.

v1: one program per (query tile of one sequence, query head). Key tiles wholly before the
tile's first query position need no mask; only the diagonal tiles apply the causal one.
An fp8 pool is read as stored * scale: k_scale folds into the scores, v_scale into the output.
With a sliding window, tiles wholly before every row's window are skipped and the tiles
across the window's start are masked too. Attention sinks (HAS_SINKS) start each row's running
max at its head's sink and its sum at 1: one more key of value zero, read on the device. Key ends
(HAS_KEY_ENDS, Gemma 3's images) replace each row's causal limit by its entry: the tile reads keys up to
its rows' furthest end and masks from the nearest, while the window still counts back from the query.
"""

import os

import torch

from ._triton import tl, triton, next_power_of_2
from .attention_prefill_gqa import paged_prefill_attention_gqa
from .attention_prefill_sdpa import paged_prefill_attention_sdpa, sdpa_prefill_applies
from .attention_prefill_tile import attend_tile
from .attention_window import first_key
from .kv_scale import scale_operands

PREFILL_KERNELS = ("v1", "v2", "sdpa")
PREFILL_KERNEL = os.environ.get("ASYNCSERVE_PREFILL_KERNEL", "v2")
if PREFILL_KERNEL not in PREFILL_KERNELS:
    raise ValueError(f"ASYNCSERVE_PREFILL_KERNEL must be one of {PREFILL_KERNELS}, got {PREFILL_KERNEL!r}")

_LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    out_ptr, query_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_loc_ptr, scale_log2e, k_scale_ptr, v_scale_ptr, sinks_ptr, key_ends_ptr, sliding_window,
    softcap_log2e,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
    QUERIES_PER_KV: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_SCALES: tl.constexpr, USE_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, HAS_KEY_ENDS: tl.constexpr,
):
    query_tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if query_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # cached tokens before the new ones
    kv_head = head // QUERIES_PER_KV

    rows = query_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # new-token index within the sequence
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = rows < q_len
    dim_mask = dims < HEAD_DIM
    q = tl.load(query_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh
                + dims[None, :], mask=row_mask[:, None] & dim_mask[None, :], other=0.0)  # [M, D]
    query_positions = context_len + rows

    table_row = block_tables_ptr + seq * stride_table
    if HAS_SCALES:
        scale_log2e = scale_log2e * tl.load(k_scale_ptr)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: no inf - inf on masked rows
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # one more key of logit sinks[head] and value zero: the running max and sum start there
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    first_query_position = context_len + query_tile * BLOCK_M
    window_starts = first_key(query_positions, sliding_window)  # [M]; 0 without a window
    # Key tiles: [lo, window_end) cross some row's window start (masked), [window_end,
    # unmasked_end) lie inside every row's window and before every row (no mask), the rest
    # cross the diagonal (masked).
    unmasked_end = (first_query_position // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(first_query_position + BLOCK_M, seq_len)
    key_ends = query_positions  # read only with HAS_KEY_ENDS
    if HAS_KEY_ENDS:  # rows may see past themselves: read to the furthest key end, mask from the nearest
        key_ends = tl.load(key_ends_ptr + q_start + rows, mask=row_mask, other=seq_len).to(tl.int32)
        kv_end = tl.minimum(tl.max(key_ends, axis=0), seq_len)
        unmasked_end = (tl.minimum(first_query_position, tl.min(key_ends, axis=0)) // BLOCK_N) * BLOCK_N
    lo = (first_key(first_query_position, sliding_window) // BLOCK_N) * BLOCK_N
    window_end = tl.minimum(tl.cdiv(first_key(first_query_position + BLOCK_M - 1, sliding_window),
                                    BLOCK_N) * BLOCK_N, unmasked_end)
    window_end = tl.maximum(window_end, lo)
    for tile_start in range(lo, window_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, tile_start, kv_end,
            query_positions, window_starts, key_ends, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
            stride_vh, scale_log2e, softcap_log2e, True, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
            BLOCK_N, DOT_PRECISION, USE_SOFTCAP, HAS_KEY_ENDS)
    for tile_start in range(window_end, unmasked_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, tile_start, kv_end,
            query_positions, window_starts, key_ends, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
            stride_vh, scale_log2e, softcap_log2e, False, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
            BLOCK_N, DOT_PRECISION, USE_SOFTCAP, HAS_KEY_ENDS)
    for tile_start in range(unmasked_end, kv_end, BLOCK_N):
        m_i, l_i, acc = attend_tile(
            q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head, tile_start, kv_end,
            query_positions, window_starts, key_ends, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
            stride_vh, scale_log2e, softcap_log2e, True, BLOCK_SIZE, HEAD_DIM, HEAD_DIM_PAD,
            BLOCK_N, DOT_PRECISION, USE_SOFTCAP, HAS_KEY_ENDS)

    if HAS_SCALES:
        acc = acc * tl.load(v_scale_ptr)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def _tile_config(max_query_len: int, head_dim_pad: int, element_size: int = 2):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). On H100 (bf16, D=128) 64x64 tiles with 4 warps
    and 3 stages beat 128-row tiles on varlen batches and tie on long prompts (~300 TFLOP/s).
    Past D=128 (Gemma's 256) key tiles halve, and fp32 query tiles too: shared memory is finite."""
    block_m = min(64, max(16, next_power_of_2(max_query_len)))
    if head_dim_pad <= 128:
        return block_m, 64, 4, 3
    if element_size > 2:
        block_m = min(block_m, 32)
    return block_m, 32, 4, 2


def paged_prefill_attention_triton(query, k_cache, v_cache, block_tables, seq_lens,
                                   query_start_loc, max_query_len, max_seq_len, scale,
                                   k_scale=1.0, v_scale=1.0, *, sliding_window=None, softcap=None,
                                   sinks=None, key_ends=None):
    """query [T, H, D] (flattened new tokens) -> out [T, H, D] by the kernel PREFILL_KERNEL names."""
    args = (query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
            max_seq_len, scale, k_scale, v_scale)
    options = {"sliding_window": sliding_window, "softcap": softcap, "sinks": sinks}
    if PREFILL_KERNEL == "v1":
        return paged_prefill_attention_v1(*args, **options, key_ends=key_ends)
    if PREFILL_KERNEL == "sdpa" and key_ends is None and sdpa_prefill_applies(
            query, k_cache, query_start_loc, max_query_len, k_scale, v_scale, **options):
        return paged_prefill_attention_sdpa(*args, **options)  # causal only: key ends take v2
    return paged_prefill_attention_gqa(*args, **options, key_ends=key_ends)


def paged_prefill_attention_v1(query, k_cache, v_cache, block_tables, seq_lens,
                               query_start_loc, max_query_len, max_seq_len, scale,
                               k_scale=1.0, v_scale=1.0, *, sliding_window=None, softcap=None,
                               sinks=None, key_ends=None):
    """The per-head kernel: query [T, H, D] -> out [T, H, D]; see attention_ref for semantics."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty_like(query)
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_pad = max(16, next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _tile_config(max_query_len, head_dim_pad, query.element_size())
    grid = (triton.cdiv(max_query_len, block_m), num_seqs, num_heads)
    k_scale, v_scale, has_scales = scale_operands(k_scale, v_scale, query)
    _prefill_kernel[grid](
        out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale * _LOG2E,
        k_scale, v_scale, query if sinks is None else sinks, query if key_ends is None else key_ends,
        sliding_window or 0, (softcap or 0.0) * _LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        QUERIES_PER_KV=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", HAS_SCALES=has_scales,
        USE_SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
        HAS_KEY_ENDS=key_ends is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return out
