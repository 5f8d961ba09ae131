"""One online-softmax step of the prefill kernels over a tile of keys read through the block table
(shared by the per-head kernel in attention_prefill and the GQA-packed one in attention_prefill_gqa)."""

from ._triton import tl, triton
from .attention_window import soft_cap


@triton.jit
def attend_tile(q, m_i, l_i, acc, k_cache_ptr, v_cache_ptr, table_row, kv_head,
                tile_start, kv_end, query_positions, window_starts, key_ends,
                stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, scale_log2e,
                softcap_log2e, CAUSAL_MASK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PRECISION: tl.constexpr, USE_SOFTCAP: tl.constexpr, HAS_KEY_ENDS: tl.constexpr):
    """Rows of q [M, D] at `query_positions` [M] over keys [tile_start, tile_start + BLOCK_N);
    scores in log2 units (scale_log2e folds 1/sqrt(D), log2(e) and an fp8 k_scale).
    With HAS_KEY_ENDS each row sees keys below its `key_ends` [M] instead of up to its position."""
    tokens = tile_start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, HEAD_DIM_PAD)
    token_mask = tokens < kv_end
    offsets = tokens % BLOCK_SIZE
    if CAUSAL_MASK or HEAD_DIM != HEAD_DIM_PAD:
        blocks = tl.load(table_row + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
        kv_mask = token_mask[:, None] & (dims < HEAD_DIM)[None, :]
        k = tl.load(k_cache_ptr + blocks[:, None] * stride_kb + offsets[:, None] * stride_kt
                    + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]
        v = tl.load(v_cache_ptr + blocks[:, None] * stride_vb + offsets[:, None] * stride_vt
                    + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
    else:  # a full tile below the diagonal: no masks at all
        blocks = tl.load(table_row + tokens // BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_cache_ptr + blocks[:, None] * stride_kb + offsets[:, None] * stride_kt
                    + kv_head * stride_kh + dims[None, :]).to(q.dtype)
        v = tl.load(v_cache_ptr + blocks[:, None] * stride_vb + offsets[:, None] * stride_vt
                    + kv_head * stride_vh + dims[None, :]).to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [M, N]
    if USE_SOFTCAP:
        scores = soft_cap(scores, softcap_log2e)
    if CAUSAL_MASK:  # also the sliding window's start: each row sees [window_starts, itself]
        if HAS_KEY_ENDS:  # ... or [window_starts, its key end)
            visible = ((tokens[None, :] < key_ends[:, None]) & token_mask[None, :]
                       & (tokens[None, :] >= window_starts[:, None]))
        else:
            visible = ((tokens[None, :] <= query_positions[:, None]) & token_mask[None, :]
                       & (tokens[None, :] >= window_starts[:, None]))
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
