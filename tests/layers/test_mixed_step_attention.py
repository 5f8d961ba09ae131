"""A mixed step's attention (decodes next to prompt chunks): the split path (decode kernel for the decodes,
prefill kernel for the chunks, copied into one output) and the one-launch path (every row through the
prefill kernel, as the GPU takes short-context steps) give the same rows, into `out` when given."""
from __future__ import annotations

import pytest
import torch

from asyncserve.layers.attention import AttentionMetadata, PagedAttention

BLOCK = 4


def _mixed_step(num_heads=4, num_kv_heads=2, head_dim=8, seed=0):
    """Two decodes (contexts 9 and 3) then a 5-token chunk after 6 cached tokens, over shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    layer = PagedAttention(num_heads, num_kv_heads, head_dim, scale=head_dim ** -0.5)
    k_cache = torch.randn(16, BLOCK, num_kv_heads, head_dim, generator=gen)
    layer.kv_cache = (k_cache, torch.randn(k_cache.shape, generator=gen))
    tables = [[7, 2, 11], [5, 0, 0], [3, 9, 14]]
    seq_lens, new = [9, 3, 11], [1, 1, 5]
    starts = [0, 1, 2, 7]
    ints = lambda values: torch.tensor(values, dtype=torch.int32)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=torch.full((7,), -1), block_tables=ints(tables), seq_lens=ints(seq_lens),
        query_start_loc=ints(starts), max_query_len=max(new), max_seq_len=max(seq_lens), num_decodes=2,
        prefill_query_start_loc=ints([0, 5]), prefill_seq_lens=ints(seq_lens[2:]),
        prefill_block_tables=ints(tables[2:]), decode_max_seq_len=9, prefill_max_seq_len=11)
    return layer, torch.randn(7, num_heads, head_dim, generator=gen), meta


def test_one_launch_and_split_paths_agree(monkeypatch):
    layer, query, meta = _mixed_step()
    split = layer.attend(query, meta)
    monkeypatch.setattr(PagedAttention, "_split_decodes", lambda self, query, meta: False)
    out = torch.full_like(query, float("nan"))
    assert layer.attend(query, meta, out) is out
    torch.testing.assert_close(out, split, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("context,decodes,split", [(2048, 1, False), (2049, 1, True), (4096, 128, False)])
def test_the_gpu_splits_only_long_decodes_with_few_programs(context, decodes, split, monkeypatch):
    layer, query, meta = _mixed_step()
    meta.decode_max_seq_len, meta.num_decodes = context, decodes
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert layer._split_decodes(query, meta) is split


def test_the_cpu_keeps_its_fused_decode_path():
    layer, query, meta = _mixed_step()
    assert layer._split_decodes(query, meta)
