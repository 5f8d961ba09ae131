"""`key_ends` in the paged attention reference (Gemma 3's image tokens attending both ways): each query row
sees exactly the keys below its entry and inside its own sliding window, equal to a dense masked softmax;
without it, the causal result is unchanged; `paged_attention` takes the reference for it."""
from __future__ import annotations

import torch

from asyncserve.kernels import paged_attention
from asyncserve.kernels.attention_ref import paged_attention_ref
from asyncserve.multimodal.inputs import ImageInput, MultiModalInputs

BLOCK = 4


def _pool(keys: torch.Tensor, values: torch.Tensor, num_blocks: int = 16):
    """One sequence's [L, Hkv, D] keys and values in a shuffled paged pool -> (k_cache, v_cache, block table)."""
    length, kv_heads, dim = keys.shape
    table = torch.randperm(num_blocks)[: -(-length // BLOCK)].to(torch.int32)
    k_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim)
    v_cache = torch.randn(num_blocks, BLOCK, kv_heads, dim)
    for position in range(length):
        k_cache[table[position // BLOCK], position % BLOCK] = keys[position]
        v_cache[table[position // BLOCK], position % BLOCK] = values[position]
    return k_cache, v_cache, table


def _dense(query, keys, values, visible, scale):
    group = query.shape[1] // keys.shape[1]
    k, v = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.einsum("thd,lhd->htl", query, k) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(-1), v)


def test_key_ends_open_a_span_both_ways_within_the_window():
    torch.manual_seed(0)
    length, new, heads, kv_heads, dim, window, scale = 23, 17, 4, 2, 8, 5, 0.3
    keys, values = torch.randn(length, kv_heads, dim), torch.randn(length, kv_heads, dim)
    query = torch.randn(new, heads, dim)
    k_cache, v_cache, table = _pool(keys, values)
    positions = torch.arange(length - new, length)                  # the chunk's rows: positions 6..22
    key_ends = positions + 1
    key_ends[3:12] = 18                                             # an image over positions 9..17
    args = (k_cache, v_cache, table[None], torch.tensor([length], dtype=torch.int32),
            torch.tensor([0, new], dtype=torch.int32), new, length, scale)
    for sliding_window in (None, window):
        out = paged_attention_ref(query, *args, sliding_window=sliding_window, key_ends=key_ends)
        key_positions = torch.arange(length)
        visible = key_positions[None, :] < key_ends[:, None]
        if sliding_window:
            visible &= key_positions[None, :] > positions[:, None] - sliding_window
        torch.testing.assert_close(out, _dense(query, keys, values, visible, scale), rtol=1e-5, atol=1e-5)
        causal = paged_attention_ref(query, *args, sliding_window=sliding_window)
        torch.testing.assert_close(paged_attention_ref(query, *args, sliding_window=sliding_window,
                                                       key_ends=positions + 1), causal)
        assert not torch.allclose(out[3:12], causal[3:12])
        torch.testing.assert_close(out[12:], causal[12:])  # rows after the span are causal as before
        torch.testing.assert_close(paged_attention(query, *args, sliding_window=sliding_window, key_ends=key_ends),
                                   out)


def test_a_chunk_never_ends_inside_a_whole_image():
    picture = ImageInput(offset=10, length=16, grid=(1, 8, 8), pixel_values=torch.zeros(1), content_hash=1)
    whole = MultiModalInputs([picture], whole_images=True)
    assert whole.chunk_length(0, 20) == 10          # stops at the image's start
    assert whole.chunk_length(0, 26) == 26          # holds all of it
    assert whole.chunk_length(10, 8) == 0           # starts at it and cannot finish it: waits
    assert whole.chunk_length(16, 8) == 0           # a cache hit ended inside it: the rest goes at once
    assert whole.chunk_length(16, 10) == 10
    assert whole.chunk_length(26, 3) == 3
    assert MultiModalInputs([picture]).chunk_length(0, 20) == 20  # Qwen's images may be cut
