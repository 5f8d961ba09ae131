"""The GQA-packed prefill kernel (v2) agrees with the torch reference; the switch keeps v1 selectable."""

import pytest
import torch

from asyncserve.kernels import attention_prefill, paged_attention_ref
from asyncserve.kernels.attention_prefill import paged_prefill_attention_v1
from asyncserve.kernels.attention_prefill_gqa import (
    PREFILL_TILES,
    PrefillTile,
    packed_rows,
    paged_prefill_attention_gqa,
    prefill_tile,
)
from asyncserve.kernels.attention_prefill_sdpa import sdpa_prefill_applies
from asyncserve.kernels.kv_scale import FP8_KV_DTYPE, quantize_kv_ref

TOLERANCE = dict(atol=2e-5, rtol=1e-5)
# New tokens 1, 7, 33 and 100 after 13, 0, 50 and 37 cached ones: a decode, a whole prompt, chunks
# after context that is no multiple of the block size.
QUERY_LENS = [1, 7, 33, 100]
SEQ_LENS = [14, 7, 83, 137]
SMALL_TILE = PrefillTile(16, 16, 4, 2)  # many query and key tiles at these sizes


def _check(paged, batch, tile=None, tolerance=TOLERANCE, **options):
    out = paged_prefill_attention_gqa(*paged.args(batch), tile=tile, **options)
    torch.testing.assert_close(out, paged_attention_ref(*paged.args(batch), **options), **tolerance)


# (num_heads, num_kv_heads, head_dim, block_size): GQA 1, 2, 4, 8; head sizes 64, 80 (padded), 128.
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size",
                         [(2, 2, 64, 16), (4, 2, 80, 8), (8, 2, 64, 16), (8, 1, 128, 16)])
def test_matches_reference_across_query_lengths_and_groups(paged, triton_device, num_heads,
                                                           num_kv_heads, head_dim, block_size):
    batch = paged.build(SEQ_LENS, QUERY_LENS, num_heads, num_kv_heads, head_dim, block_size,
                        device=triton_device)
    _check(paged, batch)


def test_a_group_of_three_heads_pads_the_tile_rows(paged, triton_device):
    batch = paged.build(SEQ_LENS, QUERY_LENS, 6, 2, 32, 8, device=triton_device)
    _check(paged, batch, tile=SMALL_TILE)


@pytest.mark.parametrize("window", [5, 40])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_sliding_window_and_softcap_over_many_tiles(paged, triton_device, window, softcap):
    batch = paged.build(SEQ_LENS, QUERY_LENS, 8, 2, 32, 8, device=triton_device)
    batch.query *= 3
    _check(paged, batch, tile=SMALL_TILE, sliding_window=window, softcap=softcap)


def test_fp8_pool_reads_through_its_scales(paged, triton_device):
    k_scale, v_scale = torch.tensor(0.05), torch.tensor(2.5)
    batch = paged.build(SEQ_LENS, QUERY_LENS, 8, 2, 80, 16)
    batch.k_cache = quantize_kv_ref(batch.k_cache * 5, k_scale, FP8_KV_DTYPE).to(triton_device)
    batch.v_cache = quantize_kv_ref(batch.v_cache * 5, v_scale, FP8_KV_DTYPE).to(triton_device)
    for name in ("query", "block_tables", "seq_lens", "query_start_loc"):
        setattr(batch, name, getattr(batch, name).to(triton_device))
    # Values reach 5 * 2.5 times the others' scale, and fp32 rounding with them.
    _check(paged, batch, tolerance=dict(atol=1e-4, rtol=1e-5), k_scale=k_scale.to(triton_device),
           v_scale=v_scale.to(triton_device))


def test_a_chunk_after_context_spans_query_and_key_tiles(paged, triton_device):
    # 70 new tokens after 61 cached: key tiles wholly before the chunk, across its diagonal, and 5
    # query tiles launched heaviest first; the second sequence is padding (no new tokens).
    batch = paged.build([131, 20], [70, 0], 8, 4, 64, 16, device=triton_device)
    _check(paged, batch, tile=SMALL_TILE)


def test_v1_and_v2_agree_and_the_switch_picks_v1(paged, triton_device, monkeypatch):
    batch = paged.build(SEQ_LENS, QUERY_LENS, 8, 2, 32, 8, device=triton_device)
    v1 = paged_prefill_attention_v1(*paged.args(batch))
    torch.testing.assert_close(paged_prefill_attention_gqa(*paged.args(batch)), v1, **TOLERANCE)

    def refuse(*args, **kwargs):
        raise AssertionError("v2 ran while PREFILL_KERNEL is v1")

    monkeypatch.setattr(attention_prefill, "PREFILL_KERNEL", "v1")
    monkeypatch.setattr(attention_prefill, "paged_prefill_attention_gqa", refuse)
    assert torch.equal(attention_prefill.paged_prefill_attention_triton(*paged.args(batch)), v1)


@pytest.mark.parametrize("head_dim", [16, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("element_size", [1, 2, 4])
@pytest.mark.parametrize("queries_per_kv_pad", [1, 2, 4, 8, 16])
def test_every_launch_gets_tile_rows_dot_can_take(head_dim, element_size, queries_per_kv_pad):
    head_dim_pad = max(16, 1 << (head_dim - 1).bit_length())
    for max_query_len in (1, 7, 512, 8192):
        tile = prefill_tile(head_dim_pad, element_size, max_query_len)
        block_q, block_m = packed_rows(tile, queries_per_kv_pad, max_query_len)
        assert block_m == block_q * queries_per_kv_pad >= 16
        assert block_m & (block_m - 1) == 0 and tile in PREFILL_TILES.values()
        assert block_q <= max(max_query_len, 16)


def test_the_torch_path_never_takes_cpu_tensors_or_options_it_lacks(paged):
    batch = paged.build([30], [30], 4, 2, 16, 8)
    args = (batch.query, batch.k_cache, batch.query_start_loc, batch.max_query_len)
    assert not sdpa_prefill_applies(*args)
    assert not sdpa_prefill_applies(*args, sliding_window=8)


def test_a_tile_too_big_for_the_gpus_shared_memory_shrinks_once(paged, triton_device, monkeypatch):
    from triton.runtime.errors import OutOfResources

    from asyncserve.kernels import attention_prefill_gqa
    batch = paged.build([40], [40], 4, 2, 16, 8, device=triton_device)
    kernel, stages_tried = attention_prefill_gqa._packed_prefill_kernel, []

    class SmallSharedMemory:
        def __getitem__(self, grid):
            def launch(*args, num_stages, **kwargs):
                stages_tried.append(num_stages)
                if num_stages > 2:
                    raise OutOfResources(200_000, 101_376, "shared memory")
                return kernel[grid](*args, num_stages=num_stages, **kwargs)
            return launch

    monkeypatch.setattr(attention_prefill_gqa, "_packed_prefill_kernel", SmallSharedMemory())
    monkeypatch.setattr(attention_prefill_gqa, "_SHRUNK", {})
    big = PrefillTile(32, 16, 4, 4)
    for _ in range(2):
        _check(paged, batch, tile=big)
    assert stages_tried == [4, 3, 2, 2]  # the second call starts from the tile that fit
