"""Triton paged attention (prefill and flash-decoding) agrees with the torch reference."""

import pytest
import torch

from asyncserve.kernels import (
    paged_attention_ref,
    paged_attention_triton,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
)

# (num_heads, num_kv_heads, head_dim, block_size): GQA ratios 1/2/4/8, small and real head
# sizes, one head size that is not a power of two.
HEAD_CONFIGS = [(4, 4, 16, 8), (4, 2, 32, 16), (8, 2, 64, 16), (8, 1, 32, 8),
                (16, 2, 128, 16), (4, 1, 80, 8)]
TOLERANCE = dict(atol=2e-5, rtol=1e-5)


def _decode(batch, seq_lens=None, **kwargs):
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables,
            batch.seq_lens if seq_lens is None else seq_lens, batch.scale)
    return paged_decode_attention_triton(*args, **kwargs), paged_decode_attention_ref(*args)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEAD_CONFIGS)
def test_prefill_matches_reference_with_cached_context(paged, triton_device, num_heads,
                                                       num_kv_heads, head_dim, block_size):
    # Full prefills, chunks after cached context, a decode, and a length-1 sequence;
    # 70 and 150 new tokens span several key tiles and two query tiles.
    seq_lens, query_lens = [1, 9, 70, 150, 45, 150], [1, 9, 3, 40, 45, 150]
    batch = paged.build(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size,
                        device=triton_device)
    out = paged_prefill_attention_triton(*paged.args(batch))
    torch.testing.assert_close(out, paged_attention_ref(*paged.args(batch)), **TOLERANCE)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEAD_CONFIGS)
@pytest.mark.parametrize("bound_max_seq_len", [True, False])
def test_decode_matches_reference_across_partitions(paged, triton_device, num_heads,
                                                    num_kv_heads, head_dim, block_size,
                                                    bound_max_seq_len):
    seq_lens = [1, 17, 64, 200, 333]  # 333 tokens split into three partitions
    batch = paged.build(seq_lens, [1] * 5, num_heads, num_kv_heads, head_dim, block_size,
                        device=triton_device)
    max_seq_len = batch.max_seq_len if bound_max_seq_len else None
    out, expected = _decode(batch, max_seq_len=max_seq_len)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("block_size", [32, 256])
def test_decode_handles_large_blocks_and_a_single_partition(paged, triton_device, block_size):
    batch = paged.build([100, 3, 57], [1] * 3, num_heads=8, num_kv_heads=2, head_dim=32,
                        block_size=block_size, device=triton_device)
    out, expected = _decode(batch, max_seq_len=100)  # one partition: no reduce kernel
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("max_seq_len", [20, 300])
def test_decode_gives_zeros_for_empty_padding_sequences(paged, triton_device, max_seq_len):
    batch = paged.build([20, 1, 7], [1] * 3, num_heads=4, num_kv_heads=2, head_dim=16,
                        block_size=8, device=triton_device)
    seq_lens = torch.tensor([20, 0, 7], dtype=torch.int32, device=triton_device)
    out, expected = _decode(batch, seq_lens=seq_lens, max_seq_len=max_seq_len)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_attention_reads_query_through_strides(paged, triton_device):
    # The query is a view into a fused qkv projection, as the attention layer passes it.
    batch = paged.build([5, 140], [5, 1], num_heads=4, num_kv_heads=2, head_dim=32,
                        block_size=16, device=triton_device)
    fused = torch.randn(6, 8, 32, device=triton_device)
    fused[:, :4] = batch.query
    batch.query = fused[:, :4]
    expected = paged_attention_ref(*paged.args(batch))
    torch.testing.assert_close(paged_prefill_attention_triton(*paged.args(batch)), expected,
                               **TOLERANCE)
    decode = paged.build([9, 140, 33], [1] * 3, num_heads=4, num_kv_heads=2, head_dim=32,
                         block_size=16, device=triton_device)
    decode.query = torch.cat([decode.query, decode.query], dim=1)[:, :4]
    out, expected = _decode(decode, max_seq_len=140)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("query_lens", [[1, 1, 1], [1, 6, 1]])
def test_paged_attention_triton_serves_decode_and_mixed_steps(paged, triton_device, query_lens):
    batch = paged.build([3, 150, 40], query_lens, num_heads=8, num_kv_heads=2, head_dim=32,
                        block_size=8, device=triton_device)
    torch.testing.assert_close(paged_attention_triton(*paged.args(batch)),
                               paged_attention_ref(*paged.args(batch)), **TOLERANCE)
