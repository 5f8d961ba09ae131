"""Sliding-window attention and logit soft-capping: the torch references against a naive dense
oracle, and the Triton prefill and decode kernels against the references, across window
boundaries (windows shorter than a block, than a key tile, than a decode partition)."""

import pytest
import torch

from asyncserve.kernels import (
    paged_attention,
    paged_attention_ref,
    paged_attention_triton,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
)

TOLERANCE = dict(atol=2e-5, rtol=1e-5)


def dense_window_attention(query, keys, values, scale, sliding_window=None, softcap=None):
    """fp64 oracle: query [t, H, D] are the last t of L positions; a query at p sees keys
    in (p - W, p] (transformers' `kv_idx > q_idx - sliding_window`)."""
    group = query.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("thd,lhd->htl", query.double(), k) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    length, new = k.shape[0], query.shape[0]
    q_pos = torch.arange(length - new, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    hidden = k_pos > q_pos
    if sliding_window:
        hidden |= k_pos <= q_pos - sliding_window
    scores = scores.masked_fill(hidden, float("-inf"))
    return torch.einsum("htl,lhd->thd", torch.softmax(scores, dim=-1), v)


def _options(window, softcap):
    return {"sliding_window": window, "softcap": softcap}


@pytest.mark.parametrize("window,softcap", [(1, None), (5, None), (8, 2.0), (13, None), (40, 3.0),
                                            (None, 1.5)])
def test_reference_matches_dense_oracle(paged, window, softcap):
    seq_lens, query_lens = [1, 9, 30, 45, 21], [1, 9, 4, 45, 1]
    batch = paged.build(seq_lens, query_lens, num_heads=8, num_kv_heads=2, head_dim=16, block_size=8)
    batch.query *= 4  # scores of several units: the soft cap bends them
    out = paged_attention_ref(*paged.args(batch), **_options(window, softcap))
    for seq, start in enumerate(batch.query_start_loc[:-1].tolist()):
        rows = slice(start, start + query_lens[seq])
        expected = dense_window_attention(batch.query[rows], batch.keys[seq], batch.values[seq],
                                          batch.scale, window, softcap)
        torch.testing.assert_close(out[rows].double(), expected, atol=1e-5, rtol=1e-5)


def test_window_changes_the_output_only_past_its_length(paged):
    """Rows whose whole context fits in the window attend as without one; the others differ."""
    batch = paged.build([20], [20], num_heads=2, num_kv_heads=1, head_dim=16, block_size=8)
    full = paged_attention_ref(*paged.args(batch))
    windowed = paged_attention_ref(*paged.args(batch), sliding_window=7)
    assert torch.equal(windowed[:7], full[:7])
    assert not torch.allclose(windowed[7:], full[7:], atol=1e-3)


@pytest.mark.parametrize("window", [1, 7, 8, 31])
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_decode_reference_matches_general_reference(paged, window, softcap):
    seq_lens = [1, 7, 8, 9, 40]
    batch = paged.build(seq_lens, [1] * 5, num_heads=8, num_kv_heads=2, head_dim=16, block_size=8)
    decoded = paged_decode_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                         batch.seq_lens, batch.scale, **_options(window, softcap))
    torch.testing.assert_close(decoded, paged_attention_ref(*paged.args(batch), **_options(window, softcap)),
                               **TOLERANCE)


# Windows below a block, between the block and a key tile, across tiles, and one covering all.
@pytest.mark.parametrize("window", [1, 6, 16, 33, 70, 500])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_prefill_kernel_matches_reference(paged, triton_device, window, softcap):
    # Whole prefills and chunks after cached context; 150 new tokens span three query tiles.
    seq_lens, query_lens = [1, 9, 70, 150, 200, 133], [1, 9, 3, 40, 150, 133]
    batch = paged.build(seq_lens, query_lens, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8,
                        device=triton_device)
    batch.query *= 3
    options = _options(window, softcap)
    out = paged_prefill_attention_triton(*paged.args(batch), **options)
    torch.testing.assert_close(out, paged_attention_ref(*paged.args(batch), **options), **TOLERANCE)


@pytest.mark.parametrize("window", [1, 5, 64, 129, 250, 1000])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_decode_kernel_matches_reference_across_partitions(paged, triton_device, window, softcap):
    seq_lens = [1, 17, 64, 130, 333]  # 333 tokens: three partitions, the first ones outside small windows
    batch = paged.build(seq_lens, [1] * 5, num_heads=8, num_kv_heads=2, head_dim=32, block_size=16,
                        device=triton_device)
    batch.query *= 3
    options = _options(window, softcap)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    out = paged_decode_attention_triton(*args, batch.max_seq_len, **options)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args, **options), **TOLERANCE)


def test_decode_kernel_single_partition_with_window(paged, triton_device):
    batch = paged.build([100, 3, 57], [1] * 3, num_heads=4, num_kv_heads=1, head_dim=16, block_size=32,
                        device=triton_device)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    out = paged_decode_attention_triton(*args, 100, sliding_window=10, softcap=1.0)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args, sliding_window=10, softcap=1.0),
                               **TOLERANCE)


def test_head_dim_256_kernels_match_reference(paged, triton_device):
    """Gemma's head size: both kernels, a window crossing the context, GQA 2."""
    batch = paged.build([40, 70], [40, 1], num_heads=4, num_kv_heads=2, head_dim=256, block_size=16,
                        device=triton_device)
    options = _options(24, 5.0)
    out = paged_prefill_attention_triton(*paged.args(batch), **options)
    torch.testing.assert_close(out, paged_attention_ref(*paged.args(batch), **options), **TOLERANCE)
    decode = paged.build([40, 70], [1, 1], num_heads=4, num_kv_heads=2, head_dim=256, block_size=16,
                         device=triton_device)
    torch.testing.assert_close(paged_attention_triton(*paged.args(decode), **options),
                               paged_attention_ref(*paged.args(decode), **options), **TOLERANCE)


def test_dispatcher_passes_the_options_to_the_reference(paged):
    batch = paged.build([30], [30], num_heads=2, num_kv_heads=1, head_dim=16, block_size=8)
    options = _options(4, 2.0)
    assert torch.equal(paged_attention(*paged.args(batch), **options),
                       paged_attention_ref(*paged.args(batch), **options))
