"""Flash-decoding over the paged KV pool: one new token per sequence.

Each program takes one KV partition of one (sequence, kv head) for all the query heads
of that GQA group, so a long context spreads over many SMs; a second kernel merges the
partitions' (max, sum, acc). Launch shapes depend only on Python ints (CUDA-graph safe).
An fp8 pool is read as stored * scale: k_scale folds into the scores, v_scale into the output.
With a sliding window, partitions wholly before the window return at once and the merge
skips them; their blocks are still in the table (the pool does not free them).
Attention sinks (HAS_SINKS) start the first partition the merge reads with the sink as its running
max and a sum of 1: one more key of weight exp(sink) and value zero, read on the device.
"""

import os

import torch

from ._triton import tl, triton, next_power_of_2
from .kv_scale import scale_operands
from .attention_window import first_key, soft_cap

_LOG2E = 1.4426950408889634
_MAX_PARTITIONS = 64
# Up to this many keys one program reads alone, writing the normalized output, rather than split them in
# two partitions plus a reduce launch: at a few programs per step (batch 1 of a small model) a launch
# (1-2 µs in a CUDA graph) outweighs two more 64-key tiles. scripts/bench_attention_launches.py measures it.
_SINGLE_PARTITION_MIN_LEN = 256
# Only together with the short-context decode graphs (runner/decode_graphs.py), which capture a graph at that
# bound. Without them a decode graph's bound is max_model_len, whose keys split into `size`-key partitions;
# an eager step of a short context must split them the same way, or graphs and eager round differently.
LONG_SINGLE_PARTITION = os.environ.get("ASYNCSERVE_SHORT_CONTEXT_GRAPHS", "1") != "0"


@triton.jit
def _decode_partition_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, scale_log2e,
    k_scale_ptr, v_scale_ptr, sinks_ptr,
    stride_qs, stride_qh, stride_os, stride_oh,
    stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_table,
    num_partitions, sliding_window, softcap_log2e,
    QUERIES_PER_KV: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, SINGLE_PARTITION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    window_start = first_key(seq_len - 1, sliding_window)
    start = partition * PARTITION_SIZE
    end = tl.minimum(start + PARTITION_SIZE, seq_len)
    if not SINGLE_PARTITION:
        if (start >= seq_len) | (end <= window_start):
            return  # the reduce kernel ignores partitions past the end or before the window
    start = tl.maximum(start, window_start)

    group = tl.arange(0, GROUP_PAD)
    heads = kv_head * QUERIES_PER_KV + group  # [G] query heads sharing this kv head
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_mask = group < QUERIES_PER_KV
    dim_mask = dims < HEAD_DIM
    q = tl.load(query_ptr + seq * stride_qs + heads[:, None] * stride_qh + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0)  # [G, D]

    table_row = block_tables_ptr + seq * stride_table
    if HAS_SCALES:
        scale_log2e = scale_log2e * tl.load(k_scale_ptr)
    m_i = tl.full([GROUP_PAD], -1e30, tl.float32)  # finite: no inf - inf on empty rows
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    if HAS_SINKS:  # the sink joins the first partition the merge reads (window_start's)
        sink = tl.load(sinks_ptr + heads, mask=head_mask, other=0.0).to(tl.float32) * 1.4426950408889634
        first = partition == window_start // PARTITION_SIZE
        m_i = tl.where(first, sink, m_i)
        l_i = tl.where(first, 1.0, l_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        blocks = tl.load(table_row + tokens // BLOCK_SIZE, mask=token_mask, other=0).to(tl.int64)
        offsets = tokens % BLOCK_SIZE
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + blocks[:, None] * stride_kb + offsets[:, None] * stride_kt
                    + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # [N, D]
        v = tl.load(v_cache_ptr + blocks[:, None] * stride_vb + offsets[:, None] * stride_vt
                    + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [G, N]
        if USE_SOFTCAP:
            scores = soft_cap(scores, softcap_log2e)
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    if HAS_SCALES:
        acc = acc * tl.load(v_scale_ptr)

    out_mask = head_mask[:, None] & dim_mask[None, :]
    if SINGLE_PARTITION:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # Partials are [B, H, P] and [B, H, P, D] contiguous, H = query heads.
        rows = (seq * (tl.num_programs(1) * QUERIES_PER_KV) + heads) * num_partitions + partition
        tl.store(part_max_ptr + rows, m_i, mask=head_mask)
        tl.store(part_sum_ptr + rows, l_i, mask=head_mask)
        tl.store(part_acc_ptr + rows[:, None] * HEAD_DIM_PAD + dims[None, :], acc, mask=out_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, seq_lens_ptr,
    stride_os, stride_oh, num_partitions, sliding_window,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    PARTITION_SIZE: tl.constexpr, PARTITIONS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    used = tl.cdiv(seq_len, PARTITION_SIZE)
    first_used = first_key(seq_len - 1, sliding_window) // PARTITION_SIZE
    parts = tl.arange(0, PARTITIONS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    part_mask = (parts < used) & (parts >= first_used)
    rows = (seq * tl.num_programs(1) + head) * num_partitions + parts
    maxes = tl.load(part_max_ptr + rows, mask=part_mask, other=-1e30)
    weights = tl.where(part_mask, tl.exp2(maxes - tl.max(maxes, axis=0)), 0.0)
    sums = tl.load(part_sum_ptr + rows, mask=part_mask, other=0.0)
    total = tl.sum(weights * sums, axis=0)
    accs = tl.load(part_acc_ptr + rows[:, None] * HEAD_DIM_PAD + dims[None, :],
                   mask=part_mask[:, None], other=0.0)  # [P, D]
    out = tl.sum(accs * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def _tile_config(head_dim_pad: int):
    """(BLOCK_N, num_warps, num_stages) of the partition kernel, tuned on H100."""
    return (64 if head_dim_pad <= 128 else 32), 4, 2


def _partition_size(num_programs_per_partition: int, max_len: int) -> int:
    """Tokens per partition: small when few (seq, kv head) pairs must fill the GPU, larger
    when the batch already does (fewer partials to merge); at most _MAX_PARTITIONS of them.
    A bound of at most single_partition_max_len keys takes one partition (no reduce launch)."""
    if num_programs_per_partition >= 256:
        size = 512
    elif num_programs_per_partition >= 64:
        size = 256
    else:
        size = 128
    single = max(size, _SINGLE_PARTITION_MIN_LEN) if LONG_SINGLE_PARTITION else size
    if max_len <= single:
        return single
    while -(-max_len // size) > _MAX_PARTITIONS:
        size *= 2
    return size


def single_partition_max_len(num_seqs: int, num_kv_heads: int) -> int:
    """The largest max_seq_len for which the decode kernel covers each sequence with one partition and
    writes the output itself, skipping the reduce launch. The choice is made on the host from the bound, so
    a CUDA graph captured for a bound keeps it: decode graphs capture one more graph at this bound."""
    return _partition_size(num_seqs * num_kv_heads, 1)


def paged_decode_attention_triton(query, k_cache, v_cache, block_tables, seq_lens, scale,
                                  max_seq_len=None, k_scale=1.0, v_scale=1.0, *, sliding_window=None,
                                  softcap=None, sinks=None):
    """query [B, H, D] -> out [B, H, D]; max_seq_len (Python int) bounds every seq_lens[b];
    sliding_window, softcap and sinks [H] as in attention_ref."""
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert query.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    queries_per_kv = num_heads // num_kv_heads
    out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    max_len = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    max_len = max(max_len, 1)
    head_dim_pad = max(16, next_power_of_2(head_dim))
    block_n, num_warps, num_stages = _tile_config(head_dim_pad)
    partition_size = _partition_size(num_seqs * num_kv_heads, max_len)
    num_partitions = -(-max_len // partition_size)
    single = num_partitions == 1
    if single:
        part_acc = part_max = part_sum = out  # unused by the single-partition kernel
    else:
        part_max = torch.empty(num_seqs, num_heads, num_partitions, dtype=torch.float32,
                               device=query.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty(num_seqs, num_heads, num_partitions, head_dim_pad,
                               dtype=torch.float32, device=query.device)
    k_scale, v_scale, has_scales = scale_operands(k_scale, v_scale, query)
    _decode_partition_kernel[(num_seqs, num_kv_heads, num_partitions)](
        out, part_acc, part_max, part_sum,
        query, k_cache, v_cache, block_tables, seq_lens, scale * _LOG2E, k_scale, v_scale,
        query if sinks is None else sinks, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        num_partitions, sliding_window or 0, (softcap or 0.0) * _LOG2E,
        QUERIES_PER_KV=queries_per_kv, GROUP_PAD=max(16, next_power_of_2(queries_per_kv)),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n,
        PARTITION_SIZE=partition_size, SINGLE_PARTITION=single,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32", USE_SOFTCAP=bool(softcap),
        HAS_SCALES=has_scales, HAS_SINKS=sinks is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if not single:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, seq_lens,
            out.stride(0), out.stride(1), num_partitions, sliding_window or 0,
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            PARTITION_SIZE=partition_size, PARTITIONS_PAD=next_power_of_2(num_partitions),
            num_warps=4,
        )
    return out
