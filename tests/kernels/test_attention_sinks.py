"""Attention sinks (GPT-OSS): a learned logit per query head in each softmax's denominator only. The torch
references against a dense fp64 oracle; the Triton decode and prefill kernels (both prefill kernels), and
the CPU decode path, against the references at awkward sizes, with and without a sliding window."""

import pytest
import torch

from asyncserve.kernels import (
    paged_attention_ref,
    paged_decode_attention_cpu,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
)
from asyncserve.kernels.attention_prefill import paged_prefill_attention_v1
from asyncserve.kernels.attention_prefill_gqa import paged_prefill_attention_gqa

TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}


def _sinks(num_heads: int, seed: int = 0) -> torch.Tensor:
    """Sinks of a few units either side of zero, as trained ones are: some heads mostly attend to the sink."""
    return 3 * torch.randn(num_heads, generator=torch.Generator().manual_seed(seed))


def dense_attention_with_sinks(query, keys, values, scale, sinks, sliding_window=None):
    """fp64 oracle, as transformers' GPT-OSS eager attention: the sink is one more column of the scores,
    dropped after the softmax."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", query.double(), k) * scale
    length, new = k.shape[0], query.shape[0]
    q_pos = torch.arange(length - new, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    hidden = k_pos > q_pos
    if sliding_window:
        hidden |= k_pos <= q_pos - sliding_window
    scores = scores.masked_fill(hidden, float("-inf"))
    sink_column = sinks.double()[:, None, None].expand(-1, new, 1)
    probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    return torch.einsum("htl,lhd->thd", probs, v)


@pytest.mark.parametrize("window", [None, 5, 13])
def test_reference_matches_dense_oracle(paged, window):
    seq_lens, query_lens = [1, 9, 30, 45, 21], [1, 9, 4, 45, 1]
    batch = paged.build(seq_lens, query_lens, num_heads=6, num_kv_heads=2, head_dim=16, block_size=8)
    sinks = _sinks(6)
    out = paged_attention_ref(*paged.args(batch), sliding_window=window, sinks=sinks)
    for seq, start in enumerate(batch.query_start_loc[:-1].tolist()):
        rows = slice(start, start + query_lens[seq])
        expected = dense_attention_with_sinks(batch.query[rows], batch.keys[seq], batch.values[seq], batch.scale,
                                              sinks, window)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)


def test_sinks_only_shrink_the_weights(paged):
    """With a sink the output is the sink-free output times sum(exp(s)) / (sum(exp(s)) + exp(sink));
    a very negative sink is no sink at all."""
    batch = paged.build([12], [12], num_heads=2, num_kv_heads=1, head_dim=16, block_size=4)
    plain = paged_attention_ref(*paged.args(batch))
    assert torch.equal(paged_attention_ref(*paged.args(batch), sinks=torch.full((2,), -1e4)), plain)
    with_sinks = paged_attention_ref(*paged.args(batch), sinks=torch.tensor([0.0, 2.0]))
    ratio = with_sinks / plain
    assert (ratio < 1).all() and (ratio > 0).all()
    torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio))  # one factor per (token, head)


@pytest.mark.parametrize("window", [None, 1, 7, 31])
def test_decode_reference_matches_general_reference(paged, window):
    seq_lens = [1, 7, 8, 9, 40]
    batch = paged.build(seq_lens, [1] * 5, num_heads=6, num_kv_heads=3, head_dim=16, block_size=8)
    sinks = _sinks(6, seed=1)
    decoded = paged_decode_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                         batch.seq_lens, batch.scale, sliding_window=window, sinks=sinks)
    expected = paged_attention_ref(*paged.args(batch), sliding_window=window, sinks=sinks)
    torch.testing.assert_close(decoded, expected, **TOLERANCE)


def test_an_empty_sequence_still_gives_zeros(paged):
    """CUDA-graph padding rows have length 0: a sink alone must not make them NaN."""
    batch = paged.build([5, 9], [1, 1], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    lengths = torch.tensor([0, 9], dtype=torch.int32)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, lengths, batch.scale)
    for attend in (paged_decode_attention_ref, paged_decode_attention_cpu):
        out = attend(*args, sinks=_sinks(4))
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.isfinite(out[1]).all()


@pytest.mark.parametrize("seq_lens", [[37], [1, 7, 8, 9, 40]])
@pytest.mark.parametrize("window", [None, 6])
def test_cpu_decode_path_matches_reference(paged, seq_lens, window):
    """One sequence (no mask) and a batch (an additive mask), both through torch's flash kernel."""
    batch = paged.build(seq_lens, [1] * len(seq_lens), num_heads=8, num_kv_heads=2, head_dim=16, block_size=8)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    sinks = _sinks(8, seed=2)
    out = paged_decode_attention_cpu(*args, sliding_window=window, sinks=sinks)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args, sliding_window=window, sinks=sinks),
                               **TOLERANCE)


def test_cpu_decode_path_reads_half_precision_sinks(paged):
    batch = paged.build([20, 3], [1, 1], num_heads=4, num_kv_heads=4, head_dim=16, block_size=8,
                        dtype=torch.bfloat16)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    sinks = _sinks(4).to(torch.bfloat16)
    torch.testing.assert_close(paged_decode_attention_cpu(*args, sinks=sinks),
                               paged_decode_attention_ref(*args, sinks=sinks), atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("window", [None, 1, 64, 129, 250])
def test_decode_kernel_matches_reference_across_partitions(paged, triton_device, window):
    """333 tokens: three partitions; the sink joins exactly one of them, the first the window reads."""
    seq_lens = [1, 17, 64, 130, 333]
    batch = paged.build(seq_lens, [1] * 5, num_heads=6, num_kv_heads=2, head_dim=24, block_size=16,
                        device=triton_device)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    sinks = _sinks(6, seed=3).to(triton_device)
    out = paged_decode_attention_triton(*args, batch.max_seq_len, sliding_window=window, sinks=sinks)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args, sliding_window=window, sinks=sinks),
                               **TOLERANCE)


def test_decode_kernel_single_partition(paged, triton_device):
    batch = paged.build([100, 3, 57], [1] * 3, num_heads=5, num_kv_heads=1, head_dim=16, block_size=32,
                        device=triton_device)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    sinks = _sinks(5, seed=4).to(triton_device)
    out = paged_decode_attention_triton(*args, 100, sliding_window=10, sinks=sinks)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args, sliding_window=10, sinks=sinks),
                               **TOLERANCE)


@pytest.mark.parametrize("kernel", [paged_prefill_attention_v1, paged_prefill_attention_gqa,
                                    paged_prefill_attention_triton])
@pytest.mark.parametrize("window", [None, 6, 70])
def test_prefill_kernels_match_reference(paged, triton_device, kernel, window):
    # Whole prefills and chunks after cached context; 3 query heads per KV head pad to 4 in the packed tile.
    seq_lens, query_lens = [1, 9, 70, 150, 133], [1, 9, 3, 40, 133]
    batch = paged.build(seq_lens, query_lens, num_heads=6, num_kv_heads=2, head_dim=24, block_size=8,
                        device=triton_device)
    sinks = _sinks(6, seed=5).to(triton_device)
    out = kernel(*paged.args(batch), sliding_window=window, sinks=sinks)
    expected = paged_attention_ref(*paged.args(batch), sliding_window=window, sinks=sinks)
    torch.testing.assert_close(out, expected, **TOLERANCE)
