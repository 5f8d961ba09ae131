"""The torch references of paged attention agree with naive dense causal attention."""

import pytest
import torch

from asyncserve.kernels import paged_attention_ref, paged_decode_attention_ref

# (context lengths, new tokens per sequence): prefill, chunked prefill after cached
# context, decode, and length-1 sequences, in one batch.
MIXED_BATCH = ([1, 9, 17, 40, 33], [1, 9, 5, 1, 12])


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size",
                         [(4, 4, 16, 8), (8, 2, 32, 16), (8, 1, 16, 8)])
def test_reference_matches_dense_causal_attention(paged, num_heads, num_kv_heads, head_dim,
                                                  block_size):
    seq_lens, query_lens = MIXED_BATCH
    batch = paged.build(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size)
    out = paged_attention_ref(*paged.args(batch))
    for seq, start in enumerate(batch.query_start_loc[:-1].tolist()):
        q = batch.query[start:start + query_lens[seq]]
        expected = paged.dense(q, batch.keys[seq], batch.values[seq], batch.scale)
        torch.testing.assert_close(out[start:start + query_lens[seq]].double(), expected,
                                   atol=1e-5, rtol=1e-5)


def test_decode_reference_matches_general_reference(paged):
    seq_lens = [1, 7, 16, 29]
    batch = paged.build(seq_lens, [1] * 4, num_heads=8, num_kv_heads=2, head_dim=16, block_size=8)
    decoded = paged_decode_attention_ref(batch.query, batch.k_cache, batch.v_cache,
                                         batch.block_tables, batch.seq_lens, batch.scale)
    torch.testing.assert_close(decoded, paged_attention_ref(*paged.args(batch)),
                               atol=1e-5, rtol=1e-5)


def test_decode_reference_gives_zeros_for_empty_padding_sequences(paged):
    batch = paged.build([5, 1], [1, 1], num_heads=2, num_kv_heads=1, head_dim=16, block_size=8)
    seq_lens = torch.tensor([5, 0], dtype=torch.int32)
    out = paged_decode_attention_ref(batch.query, batch.k_cache, batch.v_cache,
                                     batch.block_tables, seq_lens, batch.scale)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()


def test_reference_keeps_bf16_output_dtype(paged):
    batch = paged.build([12], [4], num_heads=4, num_kv_heads=2, head_dim=16, block_size=8,
                        dtype=torch.bfloat16)
    out = paged_attention_ref(*paged.args(batch))
    assert out.dtype == torch.bfloat16 and out.shape == batch.query.shape
    assert torch.isfinite(out).all()
