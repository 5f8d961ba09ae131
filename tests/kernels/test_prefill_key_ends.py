"""`key_ends` in the Triton prefill kernels (Gemma 3's image tokens attending both ways) agree with the torch
reference: images across query and key tiles, starting in the cached prefix, with and without a window,
over GQA groups and several sequences; `paged_attention` keeps such steps on the kernels."""

import pytest
import torch

from asyncserve.kernels import attention, attention_prefill, paged_attention_ref
from asyncserve.kernels.attention_prefill import paged_prefill_attention_v1
from asyncserve.kernels.attention_prefill_gqa import (
    PrefillTile,
    paged_prefill_attention_gqa,
)

TOLERANCE = {"atol": 2e-5, "rtol": 1e-5}
# A decode, a whole prompt, chunks after 50 and 37 cached tokens (as in test_prefill_attention_gqa).
QUERY_LENS = [1, 7, 33, 100]
SEQ_LENS = [14, 7, 83, 137]
# Each sequence's images as [start, end) positions, every end inside the step: one of 3 tokens in the
# prompt, one across query and key tiles and one ending the chunk, one a cache hit ended inside (its
# rows attend back to the cached part) and one of 40 tokens.
IMAGES = [[], [(2, 5)], [(52, 71), (75, 83)], [(30, 45), (60, 100)]]
SMALL_TILE = PrefillTile(16, 16, 4, 2)  # 4 tokens x 4 packed heads per query tile, 16 keys per key tile


def _key_ends(seq_lens, query_lens, images):
    """[T] int64: each new token's image end when it lies in an image, else its position + 1."""
    ends = []
    for seq_len, query_len, spans in zip(seq_lens, query_lens, images):
        positions = torch.arange(seq_len - query_len, seq_len)
        seq_ends = positions + 1
        for start, end in spans:
            seq_ends[(positions >= start) & (positions < end)] = end
        ends.append(seq_ends)
    return torch.cat(ends)


def _batch(paged, device, num_heads=8, num_kv_heads=2, head_dim=32, block_size=8):
    batch = paged.build(SEQ_LENS, QUERY_LENS, num_heads, num_kv_heads, head_dim, block_size, device=device)
    return batch, _key_ends(SEQ_LENS, QUERY_LENS, IMAGES).to(device)


@pytest.mark.parametrize("window", [None, 5, 40])
def test_packed_kernel_matches_reference_with_images_across_tiles(paged, triton_device, window):
    batch, key_ends = _batch(paged, triton_device)
    out = paged_prefill_attention_gqa(*paged.args(batch), tile=SMALL_TILE, sliding_window=window,
                                      key_ends=key_ends)
    expected = paged_attention_ref(*paged.args(batch), sliding_window=window, key_ends=key_ends)
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_packed_kernel_pads_a_group_of_three_heads_at_its_default_tile(paged, triton_device):
    batch, key_ends = _batch(paged, triton_device, num_heads=6, num_kv_heads=2, head_dim=40, block_size=16)
    out = paged_prefill_attention_gqa(*paged.args(batch), key_ends=key_ends)
    torch.testing.assert_close(out, paged_attention_ref(*paged.args(batch), key_ends=key_ends), **TOLERANCE)


@pytest.mark.parametrize("window", [None, 5])
def test_per_head_kernel_matches_reference(paged, triton_device, window):
    batch, key_ends = _batch(paged, triton_device, num_heads=4, num_kv_heads=2, head_dim=16)
    out = paged_prefill_attention_v1(*paged.args(batch), sliding_window=window, key_ends=key_ends)
    expected = paged_attention_ref(*paged.args(batch), sliding_window=window, key_ends=key_ends)
    torch.testing.assert_close(out, expected, **TOLERANCE)


def test_key_ends_one_past_each_position_give_the_causal_kernel_bit_for_bit(paged, triton_device):
    batch, _ = _batch(paged, triton_device)
    causal_ends = _key_ends(SEQ_LENS, QUERY_LENS, [[]] * len(SEQ_LENS)).to(triton_device)
    for window in (None, 5):
        causal = paged_prefill_attention_gqa(*paged.args(batch), tile=SMALL_TILE, sliding_window=window)
        out = paged_prefill_attention_gqa(*paged.args(batch), tile=SMALL_TILE, sliding_window=window,
                                          key_ends=causal_ends)
        assert torch.equal(out, causal)


def test_paged_attention_keeps_key_ends_on_the_prefill_kernel(paged, triton_device, monkeypatch):
    batch, key_ends = _batch(paged, triton_device)
    monkeypatch.setattr(attention, "use_triton", lambda tensor: True)  # the interpreter stands in for CUDA

    def refuse(*args, **kwargs):
        raise AssertionError("the torch reference ran for a step with key_ends")

    monkeypatch.setattr(attention, "paged_attention_ref", refuse)
    monkeypatch.setattr(attention, "paged_prefill_attention_ref", refuse)
    expected = paged_attention_ref(*paged.args(batch), sliding_window=5, key_ends=key_ends)
    for entry in (attention.paged_attention, attention.paged_prefill_attention):
        out = entry(*paged.args(batch), sliding_window=5, key_ends=key_ends)
        torch.testing.assert_close(out, expected, **TOLERANCE)


def test_a_step_of_lone_tokens_takes_the_decode_kernel_without_key_ends(paged, triton_device, monkeypatch):
    batch = paged.build([9, 20], [1, 1], 4, 2, 16, 8, device=triton_device)
    key_ends = batch.seq_lens.long()  # a lone token's image ends with it
    calls = []

    def decode(*args, **options):
        calls.append(options)
        return torch.zeros_like(args[0])

    monkeypatch.setattr(attention, "paged_decode_attention_triton", decode)
    attention.paged_attention_triton(*paged.args(batch), sliding_window=4, key_ends=key_ends)
    assert calls == [{"sliding_window": 4}]


def test_the_torch_path_leaves_key_ends_to_the_packed_kernel(paged, triton_device, monkeypatch):
    batch, key_ends = _batch(paged, triton_device)

    def refuse(*args, **kwargs):
        raise AssertionError("the causal-only torch path ran for a step with key_ends")

    monkeypatch.setattr(attention_prefill, "PREFILL_KERNEL", "sdpa")
    monkeypatch.setattr(attention_prefill, "sdpa_prefill_applies", lambda *args, **kwargs: True)
    monkeypatch.setattr(attention_prefill, "paged_prefill_attention_sdpa", refuse)
    out = attention_prefill.paged_prefill_attention_triton(*paged.args(batch), key_ends=key_ends)
    torch.testing.assert_close(out, paged_attention_ref(*paged.args(batch), key_ends=key_ends), **TOLERANCE)
