"""Rotary embedding fused with the KV-cache write: the one launch does what rotary_embedding then
write_kv_cache do (q and k rotated in place, rotated k and v at their slots, padding skipped)."""

import pytest
import torch

from asyncserve.kernels import (
    rotary_embedding_ref,
    rotary_write_kv_cache,
    rotary_write_kv_cache_ref,
    rotary_write_kv_cache_triton,
    write_kv_cache_ref,
)

FP8 = torch.float8_e4m3fn
MAX_POSITION = 96
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def _cos_sin_cache(rotary_dim, base=10000.0):
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    freqs = torch.arange(MAX_POSITION).float()[:, None] * (1.0 / base ** exponents)[None, :]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def _step(num_tokens, num_heads, num_kv_heads, head_dim, device, dtype=torch.float32, seed=0):
    """q, k, v as strided [T, heads, D] views of one fused qkv, as the attention layers pass them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(device, dtype)
    query = qkv[:, :num_heads]
    key = qkv[:, num_heads:num_heads + num_kv_heads]
    value = qkv[:, num_heads + num_kv_heads:]
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(device)
    return qkv, query, key, value, positions


def _pool(num_blocks, block_size, num_kv_heads, head_dim, device, dtype=torch.float32):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape).to(device, dtype), torch.randn(shape).to(device, dtype)


def test_reference_is_rotary_then_cache_write():
    _, query, key, value, positions = _step(4, 3, 1, 16, "cpu")
    k_cache, v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    slots = torch.tensor([5, -1, 0, 7])
    expected_query, expected_key = rotary_embedding_ref(positions, query.clone(), key.clone(),
                                                        _cos_sin_cache(16), True)
    rotary_write_kv_cache_ref(positions, query, key, value, k_cache, v_cache, slots, _cos_sin_cache(16), True)
    assert torch.equal(query, expected_query) and torch.equal(key, expected_key)
    assert torch.equal(k_cache[1, 1, 0], expected_key[0, 0]) and torch.equal(v_cache[0, 0, 0], value[2, 0])
    assert int((k_cache != 0).any(dim=(2, 3)).sum()) == 3  # the padding token wrote nothing


# (num_heads, num_kv_heads, head_dim, rotary_dim, block_size): Qwen2.5-0.5B's GQA 7, odd head counts,
# head_dim 80 (no power of two), Llama's 128, and partial rotary (the tail written as it is).
SHAPES = [(14, 2, 64, 64, 16), (5, 1, 80, 80, 8), (32, 8, 128, 128, 16), (6, 3, 128, 64, 8), (3, 3, 80, 32, 4)]


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rotary_dim,block_size", SHAPES)
def test_triton_matches_the_reference(triton_device, is_neox, num_heads, num_kv_heads, head_dim, rotary_dim,
                                      block_size):
    num_tokens, num_blocks = 9, 5
    qkv, query, key, value, positions = _step(num_tokens, num_heads, num_kv_heads, head_dim, triton_device)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[0, 4, 8]] = -1  # CUDA-graph padding rows
    slot_mapping = slots.to(triton_device)
    k_cache, v_cache = _pool(num_blocks, block_size, num_kv_heads, head_dim, triton_device)
    cache = _cos_sin_cache(rotary_dim).to(triton_device)
    expected_qkv, expected_k_cache, expected_v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    rotary_write_kv_cache_ref(positions, expected_qkv[:, :num_heads],
                              expected_qkv[:, num_heads:num_heads + num_kv_heads],
                              expected_qkv[:, num_heads + num_kv_heads:], expected_k_cache, expected_v_cache,
                              slot_mapping, cache, is_neox)
    rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slot_mapping, cache, is_neox)
    torch.testing.assert_close(qkv, expected_qkv, **TOLERANCE)  # q and k rotated in place, v untouched
    torch.testing.assert_close(k_cache, expected_k_cache, **TOLERANCE)
    assert torch.equal(v_cache, expected_v_cache)


def _quarter_turn_cache(rotary_dim):
    """A table whose rows rotate every pair by 0, 90, 180 or 270 degrees: exact in any arithmetic, so
    the fp8 codes compare bit for bit (the interpreter rounds fp32 -> e4m3 its own way)."""
    half = rotary_dim // 2
    turns = torch.arange(MAX_POSITION)[:, None] + torch.arange(half)[None, :]
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0])[turns % 4]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0])[turns % 4]
    return torch.cat([cos, sin], dim=-1)


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rotary_dim", [(7, 1, 64, 64), (4, 2, 80, 48)])
def test_fp8_pool_stores_the_scaled_saturated_codes_of_the_rotated_key(triton_device, is_neox, num_heads,
                                                                       num_kv_heads, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim)
    num_tokens, block_size = 6, 8
    codes = torch.randint(0, 256, (num_tokens, num_heads + 2 * num_kv_heads, head_dim), generator=gen,
                          dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    qkv = codes.view(FP8).float() * 0.5  # every value k / 0.5 is an e4m3 value: no rounding to compare
    qkv[:, num_heads, -2:] = torch.tensor([1000.0, -3000.0])  # saturate to +-448
    qkv = qkv.to(triton_device)
    query, key, value = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads], qkv[:, num_heads + num_kv_heads:]
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=gen).to(triton_device)
    slot_mapping = torch.tensor([3, -1, 9, 0, 14, 21], device=triton_device)
    k_cache = torch.zeros(3, block_size, num_kv_heads, head_dim, dtype=FP8, device=triton_device)
    v_cache = torch.zeros_like(k_cache)
    k_scale, v_scale = torch.tensor(0.5, device=triton_device), torch.tensor(0.25, device=triton_device)
    cache = _quarter_turn_cache(rotary_dim).to(triton_device)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected_qkv = qkv.clone()
    rotary_write_kv_cache_ref(positions, expected_qkv[:, :num_heads],
                              expected_qkv[:, num_heads:num_heads + num_kv_heads],
                              expected_qkv[:, num_heads + num_kv_heads:], expected_k, expected_v,
                              slot_mapping, cache, is_neox, k_scale, v_scale)
    rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slot_mapping, cache, is_neox,
                                 k_scale, v_scale)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), expected_v.view(torch.uint8))
    assert expected_k.float().abs().max() == 448.0  # the saturating path was exercised


def test_triton_of_no_tokens_writes_nothing(triton_device):
    _, query, key, value, positions = _step(0, 4, 2, 16, triton_device)
    k_cache, v_cache = _pool(2, 4, 2, 16, triton_device)
    before = k_cache.clone()
    rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache,
                                 torch.zeros(0, dtype=torch.int64, device=triton_device),
                                 _cos_sin_cache(16).to(triton_device), True)
    assert torch.equal(k_cache, before)


@pytest.mark.parametrize("slots", [[5, 1, 0], [3, -1, 6]])
def test_cpu_dispatch_keeps_the_two_torch_ops(slots):
    """CPU tensors never take Triton: rotary's reference, then the CPU cache write."""
    _, query, key, value, positions = _step(3, 4, 2, 16, "cpu", torch.bfloat16)
    k_cache, v_cache = _pool(2, 4, 2, 16, "cpu", torch.bfloat16)
    slot_mapping = torch.tensor(slots)
    expected_query, expected_key = rotary_embedding_ref(positions, query.clone(), key.clone(),
                                                        _cos_sin_cache(16), False)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(expected_key, value, expected_k, expected_v, slot_mapping)
    rotary_write_kv_cache(positions, query, key, value, k_cache, v_cache, slot_mapping, _cos_sin_cache(16), False)
    assert torch.equal(query, expected_query) and torch.equal(key, expected_key)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


def _head_norms(head_dim, device, dtype, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(head_dim, generator=gen) + 0.5).to(device, dtype),
            (torch.rand(head_dim, generator=gen) + 0.5).to(device, dtype), 1e-6)


def test_reference_with_head_norms_is_rms_norm_then_rotary_then_write():
    from asyncserve.kernels import rms_norm_ref
    _, query, key, value, positions = _step(4, 3, 1, 16, "cpu")
    k_cache, v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    q_weight, k_weight, eps = _head_norms(16, "cpu", torch.float32)
    expected_query, expected_key = rotary_embedding_ref(positions, rms_norm_ref(query, q_weight, eps),
                                                        rms_norm_ref(key, k_weight, eps), _cos_sin_cache(16), True)
    rotary_write_kv_cache_ref(positions, query, key, value, k_cache, v_cache, torch.tensor([5, -1, 0, 7]),
                              _cos_sin_cache(16), True, qk_norm=(q_weight, k_weight, eps))
    assert torch.equal(query, expected_query) and torch.equal(key, expected_key)
    assert torch.equal(k_cache[1, 1, 0], expected_key[0, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(14, 2, 64), (5, 1, 80), (32, 4, 128)])
def test_triton_with_head_norms_matches_the_reference(triton_device, dtype, is_neox, num_heads, num_kv_heads,
                                                      head_dim):
    """Qwen3's q_norm / k_norm in the same launch: each head normalized with the norm kernel's roundings, then
    rotated and written (head_dim 80: no power of two, padded lanes out of the mean)."""
    num_tokens, num_blocks, block_size = 7, 4, 8
    qkv, query, key, value, positions = _step(num_tokens, num_heads, num_kv_heads, head_dim, triton_device, dtype)
    qkv.mul_(3)  # far from unit norm: the norm has work to do
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[1, 5]] = -1
    k_cache, v_cache = _pool(num_blocks, block_size, num_kv_heads, head_dim, triton_device, dtype)
    cache = _cos_sin_cache(head_dim).to(triton_device)
    norms = _head_norms(head_dim, triton_device, dtype)
    expected_qkv, expected_k_cache, expected_v_cache = qkv.clone(), k_cache.clone(), v_cache.clone()
    split = [num_heads, num_heads + num_kv_heads]
    rotary_write_kv_cache_ref(positions, expected_qkv[:, :split[0]], expected_qkv[:, split[0]:split[1]],
                              expected_qkv[:, split[1]:], expected_k_cache, expected_v_cache,
                              slots.to(triton_device), cache, is_neox, qk_norm=norms)
    rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slots.to(triton_device), cache,
                                 is_neox, qk_norm=norms)
    tolerance = TOLERANCE if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)  # one fp16 step at most
    torch.testing.assert_close(qkv, expected_qkv, **tolerance)
    torch.testing.assert_close(k_cache, expected_k_cache, **tolerance)
    assert torch.equal(v_cache, expected_v_cache)


def test_head_norms_need_full_rotary():
    _, query, key, value, positions = _step(2, 2, 1, 32, "cpu")
    with pytest.raises(ValueError, match="full rotary"):
        rotary_write_kv_cache(positions, query, key, value, torch.zeros(1, 4, 1, 32), torch.zeros(1, 4, 1, 32),
                              torch.tensor([0, 1]), _cos_sin_cache(16), True,
                              qk_norm=_head_norms(32, "cpu", torch.float32))
