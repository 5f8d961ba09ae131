"""Rotary fused with the cache write at real model shapes on a GPU: the same bits as the two kernels it
replaces, inside a CUDA graph too."""

import pytest
import torch

from asyncserve.kernels import (
    rotary_embedding_triton,
    rotary_write_kv_cache_ref,
    rotary_write_kv_cache_triton,
    write_kv_cache_triton,
)
from asyncserve.layers.rotary import cos_sin_table
from tests.kernels.gpu_checks import assert_close_half

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FP8 = torch.float8_e4m3fn
BLOCK_SIZE = 16
# (name, heads, kv heads, head_dim, rotary_dim): Qwen2.5-0.5B, Llama-3-8B, Phi-3-style head_dim 96, Qwen3-Next's
# partial rotary, GPT-OSS's head_dim 64 with 64 heads.
SHAPES = [("qwen2.5-0.5b", 14, 2, 64, 64), ("llama-8b", 32, 8, 128, 128), ("head-dim-96", 32, 32, 96, 96),
          ("partial", 16, 2, 256, 64), ("gpt-oss", 64, 8, 64, 64)]


def _step(num_tokens, heads, kv_heads, head_dim, dtype, padding=True):
    gen = torch.Generator(device="cuda").manual_seed(num_tokens + heads)
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, generator=gen, device="cuda").to(dtype)
    num_blocks = -(-num_tokens // BLOCK_SIZE) + 8
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device="cuda")[:num_tokens]
    if padding:
        slots[1::3] = -1  # CUDA-graph padding rows (none at one token)
    positions = torch.randint(0, 32768, (num_tokens,), generator=gen, device="cuda")
    return qkv, slots, positions, num_blocks


def _views(qkv, heads, kv_heads):
    return qkv[:, :heads], qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 64, 3000])
@pytest.mark.parametrize("name,heads,kv_heads,head_dim,rotary_dim", SHAPES, ids=[s[0] for s in SHAPES])
def test_one_launch_equals_rotary_then_cache_write(name, heads, kv_heads, head_dim, rotary_dim, num_tokens,
                                                   is_neox):
    qkv, slots, positions, num_blocks = _step(num_tokens, heads, kv_heads, head_dim, torch.bfloat16)
    table = cos_sin_table(rotary_dim, 32768, 1e6, {"rope_type": "default"}).cuda()
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=torch.bfloat16, device="cuda"), torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    expected_qkv, expected_k, expected_v = qkv.clone(), k_cache.clone(), v_cache.clone()
    query, key, value = _views(expected_qkv, heads, kv_heads)
    rotary_embedding_triton(positions, query, key, table, is_neox)
    write_kv_cache_triton(key, value, expected_k, expected_v, slots)
    rotary_write_kv_cache_triton(positions, *_views(qkv, heads, kv_heads), k_cache, v_cache, slots, table, is_neox)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    # And against the fp32 reference (the rounding to bf16 of the rotated values aside).
    reference_k, reference_v = torch.zeros(shape, device="cuda"), torch.zeros(shape, device="cuda")
    original = _step(num_tokens, heads, kv_heads, head_dim, torch.bfloat16)[0].float()
    rotary_write_kv_cache_ref(positions, *_views(original, heads, kv_heads), reference_k, reference_v, slots,
                              table, is_neox)
    assert_close_half(qkv, original)
    assert_close_half(k_cache, reference_k)


@pytest.mark.parametrize("name,heads,kv_heads,head_dim,rotary_dim", SHAPES[:2], ids=[s[0] for s in SHAPES[:2]])
def test_fp8_pool_codes_equal_the_two_kernels(name, heads, kv_heads, head_dim, rotary_dim):
    qkv, slots, positions, num_blocks = _step(257, heads, kv_heads, head_dim, torch.bfloat16)
    qkv *= 40  # some values past 448 * scale: saturated
    table = cos_sin_table(rotary_dim, 32768, 5e5, {"rope_type": "default"}).cuda()
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=FP8, device="cuda"), torch.zeros(shape, dtype=FP8, device="cuda")
    k_scale, v_scale = torch.tensor(0.2, device="cuda"), torch.tensor(0.7, device="cuda")
    expected_qkv, expected_k, expected_v = qkv.clone(), k_cache.clone(), v_cache.clone()
    query, key, value = _views(expected_qkv, heads, kv_heads)
    rotary_embedding_triton(positions, query, key, table, True)
    write_kv_cache_triton(key, value, expected_k, expected_v, slots, k_scale, v_scale)
    rotary_write_kv_cache_triton(positions, *_views(qkv, heads, kv_heads), k_cache, v_cache, slots, table, True,
                                 k_scale, v_scale)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(k_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), expected_v.view(torch.uint8))
    assert expected_k.float().abs().max() == 448.0


def test_replays_in_a_cuda_graph_with_new_positions_and_slots():
    heads, kv_heads, head_dim, batch = 14, 2, 64, 8
    qkv, slots, positions, num_blocks = _step(batch, heads, kv_heads, head_dim, torch.bfloat16, padding=False)
    table = cos_sin_table(head_dim, 32768, 1e6, {"rope_type": "default"}).cuda()
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = torch.zeros(shape, dtype=torch.bfloat16, device="cuda"), torch.zeros(shape, dtype=torch.bfloat16, device="cuda")
    query, key, value = _views(qkv, heads, kv_heads)
    rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slots, table, True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slots, table, True)
    fresh = torch.randn_like(qkv)
    qkv.copy_(fresh)
    positions.copy_(torch.arange(batch, device="cuda") * 1000)
    slots.copy_(torch.tensor([7, -1, 3, 0, 100, -1, 12, 50], device="cuda"))
    k_cache.zero_()
    v_cache.zero_()
    graph.replay()
    expected_qkv = fresh.clone()
    expected_k, expected_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    rotary_write_kv_cache_triton(positions, *_views(expected_qkv, heads, kv_heads), expected_k, expected_v, slots,
                                 table, True)
    assert torch.equal(qkv, expected_qkv)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("num_tokens", [1, 64, 3000])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 4)], ids=["qwen3-8b", "qwen3-30b-a3b"])
def test_head_norms_in_the_launch_equal_the_norm_kernel_then_the_two(heads, kv_heads, num_tokens):
    """Qwen3's q_norm / k_norm (ASYNCSERVE_FUSED_QK_NORM) inside the launch, against the RMSNorm kernel, the
    rotary kernel and the cache write one after the other, in bf16 (the mean square summed in another order:
    a bf16 step at most) and inside a CUDA graph."""
    from asyncserve.kernels import rms_norm_triton
    head_dim = 128
    qkv, slots, positions, num_blocks = _step(num_tokens, heads, kv_heads, head_dim, torch.bfloat16)
    qkv.mul_(4)
    gen = torch.Generator(device="cuda").manual_seed(3)
    q_weight = (torch.rand(head_dim, generator=gen, device="cuda") + 0.5).bfloat16()
    k_weight = (torch.rand(head_dim, generator=gen, device="cuda") + 0.5).bfloat16()
    table = cos_sin_table(head_dim, 32768, 1e6, {"rope_type": "default"}).cuda()
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache, v_cache = (torch.zeros(shape, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    expected_qkv, expected_k, expected_v = qkv.clone(), k_cache.clone(), v_cache.clone()
    query, key, value = _views(expected_qkv, heads, kv_heads)
    query.copy_(rms_norm_triton(query, q_weight, 1e-6))
    key.copy_(rms_norm_triton(key, k_weight, 1e-6))
    rotary_embedding_triton(positions, query, key, table, True)
    write_kv_cache_triton(key, value, expected_k, expected_v, slots)
    static = qkv.clone()
    graph = torch.cuda.CUDAGraph()
    rotary_write_kv_cache_triton(positions, *_views(qkv, heads, kv_heads), k_cache, v_cache, slots, table, True,
                                 qk_norm=(q_weight, k_weight, 1e-6))  # compiles outside the capture
    with torch.cuda.graph(graph):
        rotary_write_kv_cache_triton(positions, *_views(static, heads, kv_heads), k_cache, v_cache, slots, table,
                                     True, qk_norm=(q_weight, k_weight, 1e-6))
    k_cache.zero_()
    graph.replay()
    for got, want in ((qkv, expected_qkv), (static, expected_qkv), (k_cache, expected_k)):
        torch.testing.assert_close(got.float(), want.float(), atol=0.07, rtol=0.02)
    assert torch.equal(v_cache, expected_v)
