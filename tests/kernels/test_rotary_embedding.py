"""Rotary embedding: neox style equals Hugging Face's apply_rotary_pos_emb, GPT-J style
equals a complex rotation of interleaved pairs, and Triton equals the reference."""

import pytest
import torch

from asyncserve.kernels import rotary_embedding_ref, rotary_embedding_triton

MAX_POSITION = 64


def _cos_sin_cache(rotary_dim, base=10000.0):
    """[MAX_POSITION, rotary_dim]: cos then sin, as Llama's default rope computes them."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    freqs = torch.arange(MAX_POSITION).float()[:, None] * inv_freq[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def test_neox_reference_equals_hugging_face_apply_rotary_pos_emb():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 4, 2, 32
    positions = torch.tensor([0, 5, 6, 7, 63, 1])
    query = torch.randn(num_tokens, num_heads, head_dim)
    key = torch.randn(num_tokens, num_kv_heads, head_dim)
    cache = _cos_sin_cache(head_dim)
    cos = cache[positions, :head_dim // 2].repeat(1, 2)[None]  # [1, T, D] as HF builds it
    sin = cache[positions, head_dim // 2:].repeat(1, 2)[None]
    hf_query, hf_key = modeling_llama.apply_rotary_pos_emb(
        query.transpose(0, 1)[None], key.transpose(0, 1)[None], cos, sin)
    out_query, out_key = rotary_embedding_ref(positions, query.clone(), key.clone(), cache, True)
    torch.testing.assert_close(out_query, hf_query[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out_key, hf_key[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_gptj_reference_rotates_interleaved_pairs_as_complex_numbers():
    positions = torch.tensor([3, 0, 17])
    query, key = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    cache = _cos_sin_cache(16)
    rotation = torch.polar(torch.ones(3, 1, 8), torch.atan2(cache[positions, None, 8:],
                                                            cache[positions, None, :8]))
    expected = torch.view_as_real(torch.view_as_complex(query.view(3, 2, 8, 2)) * rotation)
    out_query, _ = rotary_embedding_ref(positions, query.clone(), key.clone(), cache, False)
    torch.testing.assert_close(out_query, expected.view(3, 2, 16), atol=1e-5, rtol=1e-5)


def test_reference_rotates_in_place_and_leaves_the_tail_past_rotary_dim():
    positions = torch.tensor([1, 2])
    query, key = torch.randn(2, 2, 32), torch.randn(2, 1, 32)
    tail = query[..., 16:].clone()
    out_query, out_key = rotary_embedding_ref(positions, query, key, _cos_sin_cache(16), True)
    assert out_query.data_ptr() == query.data_ptr() and out_key.data_ptr() == key.data_ptr()
    assert torch.equal(query[..., 16:], tail)


@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,flat",
                         [(4, 4, 16, False), (8, 2, 64, True), (32, 8, 128, True),
                          (5, 1, 48, False)])
def test_triton_matches_reference(triton_device, is_neox, num_heads, num_kv_heads, head_dim, flat):
    num_tokens = 7
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), device=triton_device)
    # query and key are views into a fused qkv projection, 2-D [T, heads * D] or 3-D.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, device=triton_device)
    query = qkv[:, :num_heads * head_dim]
    key = qkv[:, num_heads * head_dim:(num_heads + num_kv_heads) * head_dim]
    if not flat:
        query = query.view(num_tokens, num_heads, head_dim)
        key = key.view(num_tokens, num_kv_heads, head_dim)
    cache = _cos_sin_cache(head_dim).to(triton_device)
    expected_query, expected_key = rotary_embedding_ref(positions, query.clone(), key.clone(),
                                                        cache, is_neox)
    value_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    out_query, out_key = rotary_embedding_triton(positions, query, key, cache, is_neox)
    torch.testing.assert_close(out_query, expected_query, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_key, expected_key, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], value_before)


def test_triton_partial_rotary_leaves_the_tail(triton_device):
    positions = torch.tensor([4, 9, 0], device=triton_device)
    query = torch.randn(3, 4, 64, device=triton_device)
    key = torch.randn(3, 2, 64, device=triton_device)
    cache = _cos_sin_cache(32).to(triton_device)
    expected = rotary_embedding_ref(positions, query.clone(), key.clone(), cache, True)
    out = rotary_embedding_triton(positions, query, key, cache, True)
    torch.testing.assert_close(out[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], expected[1], atol=1e-5, rtol=1e-5)
