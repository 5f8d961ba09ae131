"""Writing new tokens' K/V into the paged pool, Triton and reference, padding slots skipped."""

import pytest
import torch

from asyncserve.kernels import write_kv_cache_cpu, write_kv_cache_ref, write_kv_cache_triton


def _pool(num_blocks, block_size, num_kv_heads, head_dim, device):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, device=device), torch.randn(shape, device=device)


def test_reference_writes_each_token_at_its_slot_and_skips_padding():
    key, value = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    k_cache, v_cache = torch.zeros(4, 2, 2, 4), torch.zeros(4, 2, 2, 4)
    write_kv_cache_ref(key, value, k_cache, v_cache, torch.tensor([5, -1, 0]))
    assert torch.equal(k_cache[2, 1], key[0]) and torch.equal(v_cache[2, 1], value[0])
    assert torch.equal(k_cache[0, 0], key[2]) and torch.equal(v_cache[0, 0], value[2])
    assert int((k_cache != 0).any(dim=(2, 3)).sum()) == 2  # the padding token wrote nothing


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 16, 8), (2, 32, 16),
                                                              (8, 128, 16), (3, 80, 8)])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
def test_triton_matches_reference(triton_device, num_kv_heads, head_dim, block_size, slot_dtype):
    num_blocks, num_tokens = 7, 13
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7, 12]] = -1  # CUDA-graph padding tokens
    slot_mapping = slots.to(slot_dtype).to(triton_device)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=triton_device)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, device=triton_device)
    k_cache, v_cache = _pool(num_blocks, block_size, num_kv_heads, head_dim, triton_device)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_expected, v_expected, slot_mapping)
    write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_triton_reads_key_and_value_through_strides(triton_device):
    # key and value are views into a fused qkv projection [T, (H + 2 Hkv) * D].
    num_tokens, num_heads, num_kv_heads, head_dim = 5, 4, 2, 16
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=triton_device)
    key = qkv[:, num_heads:num_heads + num_kv_heads]
    value = qkv[:, num_heads + num_kv_heads:]
    slot_mapping = torch.tensor([3, 9, -1, 0, 14], device=triton_device)
    k_cache, v_cache = _pool(2, 8, num_kv_heads, head_dim, triton_device)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_expected, v_expected, slot_mapping)
    write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("slots", [[5, 1, 0], [3, -1, 6], [-1, -1, -1], []])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_version_matches_reference(slots, dtype):
    """Through a fused qkv's strided views; padding anywhere falls back to the reference."""
    num_tokens = len(slots)
    qkv = torch.randn(num_tokens, 4 + 2 * 2, 16)
    key, value = qkv[:, 4:6], qkv[:, 6:]
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    k_cache, v_cache = (t.to(dtype) for t in _pool(2, 4, 2, 16, "cpu"))
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_expected, v_expected, slot_mapping)
    write_kv_cache_cpu(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


def test_cpu_version_with_scales_or_fp8_pool_is_the_reference():
    key, value = torch.randn(2, 1, 16), torch.randn(2, 1, 16)
    slot_mapping = torch.tensor([1, 6])
    for pool_dtype, scales in ((torch.float8_e4m3fn, {}), (torch.float32, {"k_scale": 0.5, "v_scale": 2.0})):
        k_cache, v_cache = torch.zeros(2, 4, 1, 16, dtype=pool_dtype), torch.zeros(2, 4, 1, 16, dtype=pool_dtype)
        k_expected, v_expected = k_cache.clone(), v_cache.clone()
        write_kv_cache_ref(key, value, k_expected, v_expected, slot_mapping, **scales)
        write_kv_cache_cpu(key, value, k_cache, v_cache, slot_mapping, **scales)
        assert torch.equal(k_cache.float(), k_expected.float()) and torch.equal(v_cache.float(), v_expected.float())
