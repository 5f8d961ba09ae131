"""The CPU decode attention (torch's fused attention over gathered blocks) agrees with the reference on
awkward sizes: partial blocks, odd block sizes and head dims, GQA groups, windows, NaN in stale slots."""

import pytest
import torch

from asyncserve.kernels import paged_decode_attention, paged_decode_attention_cpu, paged_decode_attention_ref


def _both(batch, seq_lens=None, **options):
    seq_lens = batch.seq_lens if seq_lens is None else seq_lens
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, seq_lens, batch.scale,
            int(seq_lens.max()))
    return paged_decode_attention_cpu(*args, **options), paged_decode_attention_ref(*args, **options)


@pytest.mark.parametrize("seq_lens", [[1], [5], [16], [17], [301], [1, 7, 16, 29, 3], [40, 1]])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size",
                         [(9, 3, 64, 16), (4, 4, 24, 5), (6, 1, 40, 3), (8, 2, 17, 16)])
def test_matches_the_reference(paged, seq_lens, num_heads, num_kv_heads, head_dim, block_size):
    batch = paged.build(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, head_dim, block_size,
                        seed=len(seq_lens) + head_dim)
    out, expected = _both(batch)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert not out.isnan().any()  # the pool's stale slots and unused table entries hold NaN
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("seq_lens", [[23], [1, 9, 33, 20]])
@pytest.mark.parametrize("window", [1, 4, 16, 100])
def test_sliding_window_matches_the_reference(paged, seq_lens, window):
    batch = paged.build(seq_lens, [1] * len(seq_lens), 4, 2, 32, 8, seed=window)
    out, expected = _both(batch, sliding_window=window)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)


def test_empty_padding_sequences_give_zeros(paged):
    batch = paged.build([5, 1, 12], [1, 1, 1], num_heads=2, num_kv_heads=1, head_dim=16, block_size=8)
    seq_lens = torch.tensor([5, 0, 12], dtype=torch.int32)
    out, expected = _both(batch, seq_lens)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)
    only_padding = torch.zeros(3, dtype=torch.int32)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, only_padding, batch.scale, 0)
    assert torch.equal(paged_decode_attention_cpu(*args), torch.zeros_like(batch.query))


def test_table_entries_past_a_length_may_hold_anything(paged):
    batch = paged.build([3, 20], [1, 1], num_heads=4, num_kv_heads=2, head_dim=16, block_size=4)
    expected = paged_decode_attention_ref(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                          batch.seq_lens, batch.scale)
    batch.block_tables[0, 1:] = 10 ** 6  # not a block of this pool
    out = paged_decode_attention_cpu(batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
                                     batch.seq_lens, batch.scale, 20)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)


def test_bfloat16_attends_in_float32_as_the_reference(paged):
    batch = paged.build([2, 37], [1, 1], 8, 2, 32, 16, dtype=torch.bfloat16)
    out, expected = _both(batch)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_softcap_and_kv_scales_take_the_reference(paged):
    batch = paged.build([9, 30], [1, 1], 4, 2, 16, 8)
    for options in ({"softcap": 5.0}, {"k_scale": 0.5, "v_scale": 2.0}):
        out, expected = _both(batch, **options)
        assert torch.equal(out, expected)


def test_the_dispatcher_takes_it_for_cpu_tensors(paged, monkeypatch):
    import asyncserve.kernels.attention as attention
    calls = []
    monkeypatch.setattr(attention, "paged_decode_attention_cpu", lambda *args, **kw: calls.append(args) or 0)
    batch = paged.build([4], [1], 2, 1, 16, 8)
    paged_decode_attention(batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
                           batch.scale, 4)
    assert len(calls) == 1
