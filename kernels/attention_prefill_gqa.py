"""Prefill attention over the paged KV pool with the query heads of one KV head packed into each tile.

One program per (query tile of one sequence, KV head): the tile's rows are BLOCK_Q new tokens x the
QUERIES_PER_KV query heads that share the KV head (token-major, heads padded to a power of two), so a
K/V tile is read once for all of them instead of once per query head (4x fewer reads for 32/8 GQA), and
its products are QUERIES_PER_KV times taller. Query tiles run heaviest first (the last tokens of a
causal prompt see the most keys), so the tail of the grid is short. Masks, sliding window, softcap,
fp8 scales, attention sinks and key ends are those of attention_prefill's per-head kernel, which stays the
reference.
"""

from dataclasses import dataclass

import torch

from ._triton import HAS_TRITON, tl, triton, next_power_of_2
from .attention_prefill_tile import attend_tile
from .attention_window import first_key
from .kv_scale import scale_operands

_LOG2E = 1.4426950408889634
if HAS_TRITON:
    from triton.runtime.errors import OutOfResources as _OUT_OF_RESOURCES
else:
    _OUT_OF_RESOURCES = ()  # catches nothing: the launch raises ModuleNotFoundError


@dataclass(frozen=True)
class PrefillTile:
    """A launch configuration: rows per tile (query tokens x packed heads), keys per step, warps, stages."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Query lengths from this one on take the "long" tile: enough tiles to fill the GPU with big ones.
LONG_QUERY = 1024
# (padded head_dim, query element bytes, long queries) -> tile. Shared memory bounds the big head sizes
# and fp32 (the CPU interpreter's tests); bf16/fp16 at D <= 128 is the Hopper case the benchmark sweeps
# (scripts/bench_prefill_attention.py) and whose winner belongs here.
PREFILL_TILES: dict[tuple[int, int, bool], PrefillTile] = {
    (64, 2, False): PrefillTile(64, 64, 4, 3),
    (64, 2, True): PrefillTile(128, 64, 4, 3),
    (128, 2, False): PrefillTile(64, 64, 4, 3),
    (128, 2, True): PrefillTile(128, 128, 8, 2),  # H100 sweep, 2026-12-07: 16k 5.77 ms, 32k 22.4 (FA2 6.37, 24.9)
    (256, 2, False): PrefillTile(64, 32, 4, 2),
    (256, 2, True): PrefillTile(64, 32, 4, 2),
    (64, 4, False): PrefillTile(64, 32, 4, 2),
    (64, 4, True): PrefillTile(64, 32, 4, 2),
    (128, 4, False): PrefillTile(32, 32, 4, 2),
    (128, 4, True): PrefillTile(32, 32, 4, 2),
    (256, 4, False): PrefillTile(32, 16, 4, 2),
    (256, 4, True): PrefillTile(32, 16, 4, 2),
}


# A tile whose launch ran out of shared memory on this GPU (the table is sized for Hopper's) -> the
# smaller one that replaced it, so each is tried once.
_SHRUNK: dict[PrefillTile, PrefillTile] = {}


def prefill_tile(head_dim_pad: int, element_size: int, max_query_len: int) -> PrefillTile:
    """The table's tile for a launch: head sizes round up to 64, 128 or 256; 1-byte queries count as 2."""
    head_key = 64 if head_dim_pad <= 64 else (128 if head_dim_pad <= 128 else 256)
    return PREFILL_TILES[(head_key, 4 if element_size >= 4 else 2, max_query_len >= LONG_QUERY)]


def _smaller(tile: PrefillTile) -> PrefillTile | None:
    """Half the shared memory: fewer stages first, then half the keys, then half the rows."""
    if tile.num_stages > 2:
        return PrefillTile(tile.block_m, tile.block_n, tile.num_warps, tile.num_stages - 1)
    if tile.block_n > 16:
        return PrefillTile(tile.block_m, tile.block_n // 2, tile.num_warps, tile.num_stages)
    if tile.block_m > 16:
        return PrefillTile(tile.block_m // 2, tile.block_n, min(tile.num_warps, 4), tile.num_stages)
    return None


@triton.jit
def _packed_prefill_kernel(
    out_ptr, query_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    query_start_loc_ptr, scale_log2e, k_scale_ptr, v_scale_ptr, sinks_ptr, key_ends_ptr, sliding_window,
    softcap_log2e,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
    QUERIES_PER_KV: tl.constexpr, QUERIES_PER_KV_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_SCALES: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_KEY_ENDS: tl.constexpr,
):
    query_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest first
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if query_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # cached tokens before the new ones

    rows = tl.arange(0, BLOCK_M)  # row = token * QUERIES_PER_KV_PAD + head within the KV group
    tokens = query_tile * BLOCK_Q + rows // QUERIES_PER_KV_PAD  # new-token index within the sequence
    group_heads = rows % QUERIES_PER_KV_PAD
    heads = kv_head * QUERIES_PER_KV + group_heads
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = (tokens < q_len) & (group_heads < QUERIES_PER_KV)
    io_mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]
    q = tl.load(query_ptr + (q_start + tokens)[:, None] * stride_qt + heads[:, None] * stride_qh
                + dims[None, :], mask=io_mask, other=0.0)  # [M, D]
    query_positions = context_len + tokens

    table_row = block_tables_ptr + seq * stride_table
    if HAS_SCALES:
        scale_log2e = scale_log2e * tl.load(k_scale_ptr)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: no inf - inf on masked rows
    l_i = tl.zeros([BLOCK_M], tl.float32)
    if HAS_SINKS:  # one more key of logit sinks[head] and value zero: the running max and sum start there
        m_i = tl.load(sinks_ptr + heads, mask=row_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    first_query_position = context_len + query_tile * BLOCK_Q
    window_starts = first_key(query_positions, sliding_window)  # [M]; 0 without a window
    # Key tiles: [lo, window_end) cross some row's window start (masked), [window_end,
    # unmasked_end) lie inside every row's window and before every row (no mask), the rest
    # cross the diagonal (masked). Tiles wholly after the tile's last token are never read.
    unmasked_end = (first_query_position // BLOCK_N) * BLOCK_N
    kv_end = tl.minimum(first_query_position + BLOCK_Q, seq_len)
    key_ends = query_positions  # read only with HAS_KEY_ENDS
    if HAS_KEY_ENDS:  # rows may see past themselves: read to the furthest key end, mask from the nearest
        key_ends = tl.load(key_ends_ptr + q_start + tokens, mask=tokens < q_len, other=seq_len).to(tl.int32)
        kv_end = tl.minimum(tl.max(key_ends, axis=0), seq_len)
        unmasked_end = (tl.minimum(first_query_position, tl.min(key_ends, axis=0)) // BLOCK_N) * BLOCK_N
    lo = (first_key(first_query_position, sliding_window) // BLOCK_N) * BLOCK_N
    window_end = tl.minimum(tl.cdiv(first_key(first_query_position + BLOCK_Q - 1, sliding_window),
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
    tl.store(out_ptr + (q_start + tokens)[:, None] * stride_ot + heads[:, None] * stride_oh
             + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=io_mask)


def packed_rows(tile: PrefillTile, queries_per_kv_pad: int, max_query_len: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_M): query tokens per tile, shrunk for short queries, and rows = tokens x heads
    (at least 16, tl.dot's smallest)."""
    block_q = max(1, tile.block_m // queries_per_kv_pad)
    block_q = min(block_q, next_power_of_2(max_query_len))
    block_q = max(block_q, 16 // queries_per_kv_pad, 1)
    return block_q, block_q * queries_per_kv_pad


def paged_prefill_attention_gqa(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
                                max_query_len, max_seq_len, scale, k_scale=1.0, v_scale=1.0, *,
                                sliding_window=None, softcap=None, sinks=None, key_ends=None,
                                tile: PrefillTile | None = None):
    """query [T, H, D] (flattened new tokens) -> out [T, H, D]; see attention_ref for semantics.
    `tile` overrides PREFILL_TILES (the benchmark's sweep)."""
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    out = torch.empty_like(query)
    num_seqs = query_start_loc.shape[0] - 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    head_dim_pad = max(16, next_power_of_2(head_dim))
    queries_per_kv_pad = next_power_of_2(num_heads // num_kv_heads)
    tile = tile or prefill_tile(head_dim_pad, query.element_size(), max_query_len)
    while tile in _SHRUNK:
        tile = _SHRUNK[tile]
    k_scale, v_scale, has_scales = scale_operands(k_scale, v_scale, query)
    while True:
        block_q, block_m = packed_rows(tile, queries_per_kv_pad, max_query_len)
        grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
        try:
            _packed_prefill_kernel[grid](
                out, query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale * _LOG2E,
                k_scale, v_scale, query if sinks is None else sinks, query if key_ends is None else key_ends,
                sliding_window or 0,
                (softcap or 0.0) * _LOG2E,
                query.stride(0), query.stride(1), out.stride(0), out.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
                QUERIES_PER_KV=num_heads // num_kv_heads, QUERIES_PER_KV_PAD=queries_per_kv_pad,
                BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_Q=block_q,
                BLOCK_M=block_m, BLOCK_N=tile.block_n,
                DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                HAS_SCALES=has_scales, USE_SOFTCAP=bool(softcap), HAS_SINKS=sinks is not None,
                HAS_KEY_ENDS=key_ends is not None, num_warps=tile.num_warps, num_stages=tile.num_stages,
            )
            return out
        except _OUT_OF_RESOURCES:
            smaller = _smaller(tile)
            if smaller is None:
                raise
            _SHRUNK[tile] = tile = smaller
