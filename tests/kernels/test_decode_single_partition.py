"""The decode kernel skips its reduce launch when one partition covers the bound (max_seq_len): the choice
is the host's, from the bound alone, so that a CUDA graph captured for a bound keeps it."""

import pytest
import torch

import asyncserve.kernels.attention_decode as attention_decode
from asyncserve.kernels import paged_decode_attention_ref, paged_decode_attention_triton
from asyncserve.kernels.attention_decode import single_partition_max_len

TOLERANCE = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def long_single_partition(monkeypatch):
    """One partition up to the short-context bound: what the kernel does with the short-context graphs on."""
    monkeypatch.setattr(attention_decode, "LONG_SINGLE_PARTITION", True)


@pytest.mark.parametrize("num_seqs,num_kv_heads", [(1, 1), (1, 2), (3, 7), (8, 8), (32, 8), (64, 8), (256, 2)])
@pytest.mark.parametrize("short", [1, 17, 128, 300, 2048])
def test_without_the_short_graphs_a_short_context_splits_as_the_graphs_bound_does(monkeypatch, num_seqs,
                                                                                 num_kv_heads, short):
    """Off, an eager step splits its keys where a graph captured at max_model_len splits them (the same
    partition size), so both round alike: greedy tokens of graphs and eager agree in bf16."""
    monkeypatch.setattr(attention_decode, "LONG_SINGLE_PARTITION", False)
    programs = num_seqs * num_kv_heads
    assert attention_decode._partition_size(programs, short) == attention_decode._partition_size(programs, 4096)


@pytest.mark.parametrize("num_seqs,num_kv_heads", [(1, 1), (1, 2), (3, 7), (8, 8), (32, 8), (64, 8), (256, 2)])
def test_the_bound_is_the_longest_context_of_one_partition(num_seqs, num_kv_heads):
    bound = single_partition_max_len(num_seqs, num_kv_heads)
    programs = num_seqs * num_kv_heads
    assert bound >= 256  # batch 1 of a small model: prompt and output of a few hundred tokens in one launch
    assert attention_decode._partition_size(programs, bound) >= bound  # one partition covers the bound
    longer = attention_decode._partition_size(programs, bound + 1)
    assert -(-(bound + 1) // longer) > 1  # one key more: split, and merged by the reduce kernel


def test_bounds_do_not_shrink_as_the_batch_grows():
    bounds = [single_partition_max_len(num_seqs, 8) for num_seqs in (1, 2, 4, 8, 16, 32, 64, 128)]
    assert bounds == sorted(bounds)


def _no_reduce(*_args, **_kwargs):
    raise AssertionError("the reduce kernel was launched")


class _Forbidden:
    def __getitem__(self, _grid):
        return _no_reduce


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [(14, 2, 64, 16), (5, 1, 80, 8),
                                                                        (12, 4, 128, 16)])
def test_a_single_partition_writes_the_normalized_output_alone(paged, triton_device, monkeypatch, num_heads,
                                                               num_kv_heads, head_dim, block_size):
    seq_lens = [256, 1, 131, 255, 64]
    bound = single_partition_max_len(len(seq_lens), num_kv_heads)
    assert bound >= max(seq_lens)
    batch = paged.build(seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, head_dim, block_size,
                        device=triton_device)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    monkeypatch.setattr(attention_decode, "_decode_reduce_kernel", _Forbidden())
    out = paged_decode_attention_triton(*args, bound)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args), **TOLERANCE)


def test_past_the_bound_the_partitions_are_merged(paged, triton_device):
    seq_lens = [257, 3]
    batch = paged.build(seq_lens, [1, 1], 8, 2, 32, 16, device=triton_device)
    assert single_partition_max_len(2, 2) < 257
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    out = paged_decode_attention_triton(*args, 257)
    torch.testing.assert_close(out, paged_decode_attention_ref(*args), **TOLERANCE)
