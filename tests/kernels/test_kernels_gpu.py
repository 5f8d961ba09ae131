"""Triton kernels at real model shapes on a GPU, bf16/fp16 against the fp32 reference."""

import pytest
import torch

import asyncserve.kernels as kernels
from tests.kernels.gpu_checks import assert_close_half, shuffled_block_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
HALF_DTYPES = [torch.bfloat16, torch.float16]



def _pool_batch(seq_lens, query_lens, dtype, seed=0):
    """Random pool with shuffled block ids; the fp32 copies feed the reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_needed = [-(-length // BLOCK_SIZE) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 64
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    block_tables = shuffled_block_tables(blocks_needed, num_blocks, gen)
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen, device="cuda")
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    args = (query.to(dtype), k_cache, v_cache, block_tables, lengths.cuda(), starts.cuda(),
            max(query_lens), max(seq_lens), HEAD_DIM ** -0.5)
    reference_args = (query, k_cache.float(), v_cache.float()) + args[3:]
    return args, reference_args


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("bound_max_seq_len", [True, False])
def test_decode_batch_of_64_up_to_4096_tokens(dtype, bound_max_seq_len):
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    seq_lens[:3] = [1, 4096, 17]
    args, reference_args = _pool_batch(seq_lens, [1] * 64, dtype)
    query, k_cache, v_cache, block_tables, lengths, _, _, max_seq_len, scale = args
    out = kernels.paged_decode_attention(query, k_cache, v_cache, block_tables, lengths, scale,
                                         max_seq_len if bound_max_seq_len else None)
    expected = kernels.paged_decode_attention_ref(*reference_args[:5], scale)
    assert out.dtype == dtype
    assert_close_half(out, expected, dtype)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_prefill_chunked_prefill_and_decode_in_one_step(dtype):
    seq_lens = [4096, 3000, 700, 1, 129, 2048]
    query_lens = [4096, 512, 700, 1, 1, 300]  # full prompts, chunks after context, decodes
    args, reference_args = _pool_batch(seq_lens, query_lens, dtype)
    out = kernels.paged_attention(*args)
    assert_close_half(out, kernels.paged_attention_ref(*reference_args), dtype)


def test_decode_replays_in_a_cuda_graph_with_new_lengths():
    args, _ = _pool_batch([300, 2000, 4000, 50], [1] * 4, torch.bfloat16)
    query, k_cache, v_cache, block_tables, lengths, _, _, _, scale = args

    def decode():
        return kernels.paged_decode_attention(query, k_cache, v_cache, block_tables, lengths,
                                              scale, max_seq_len=4096)

    decode()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = decode()
    lengths.copy_(torch.tensor([1, 4000, 17, 2], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_out, decode())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_write_kv_cache_at_real_shapes(dtype):
    num_tokens = 1000
    key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda").to(dtype)
    value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda").to(dtype)
    slot_mapping = torch.randperm(4096 * BLOCK_SIZE, device="cuda")[:num_tokens]
    slot_mapping[::7] = -1
    shape = (4096, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda").to(dtype)
    v_cache = torch.randn(shape, device="cuda").to(dtype)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    kernels.write_kv_cache_ref(key, value, k_expected, v_expected, slot_mapping)
    kernels.write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected) and torch.equal(v_cache, v_expected)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_norms_rotary_and_activation_at_real_shapes(dtype):
    x = torch.randn(64, 4096, device="cuda").to(dtype)
    residual = torch.randn(64, 4096, device="cuda").to(dtype)
    weight = (1 + 0.1 * torch.randn(4096, device="cuda")).to(dtype)
    assert_close_half(kernels.rms_norm(x, weight, 1e-5), kernels.rms_norm_ref(x, weight, 1e-5), dtype)
    out, new_residual = kernels.fused_add_rms_norm(x, residual, weight, 1e-5)
    expected_out, expected_residual = kernels.fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, expected_residual)
    assert_close_half(out, expected_out, dtype)

    positions = torch.randint(0, 4096, (64,), device="cuda")
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM))
    freqs = torch.arange(4096, device="cuda").float()[:, None] * inv_freq
    cos_sin_cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    query = torch.randn(64, NUM_HEADS * HEAD_DIM, device="cuda").to(dtype)
    key = torch.randn(64, NUM_KV_HEADS * HEAD_DIM, device="cuda").to(dtype)
    for is_neox in (True, False):
        expected = kernels.rotary_embedding_ref(positions, query.clone(), key.clone(),
                                                cos_sin_cache, is_neox)
        rotated = kernels.rotary_embedding(positions, query.clone(), key.clone(), cos_sin_cache,
                                           is_neox)
        assert_close_half(rotated[0], expected[0], dtype)
        assert_close_half(rotated[1], expected[1], dtype)

    gate_up = torch.randn(64, 2 * 14336, device="cuda").to(dtype)
    assert_close_half(kernels.silu_and_mul(gate_up), kernels.silu_and_mul_ref(gate_up), dtype)
