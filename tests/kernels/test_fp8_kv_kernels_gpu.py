"""FP8 KV pool at real shapes on a GPU (head_dim 128, 8 kv heads, 32 query heads, blocks of 16, contexts
up to 4k): the Triton cache write, decode and prefill kernels against the torch references."""

import pytest
import torch

import asyncserve.kernels as kernels
from asyncserve.kernels.kv_scale import quantize_kv_ref
from tests.kernels.gpu_checks import assert_close_half, shuffled_block_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
FP8 = torch.float8_e4m3fn
K_SCALE, V_SCALE = 0.03, 0.015  # keys up to ~13, values up to ~6.7: e4m3's whole range is used



def _fp8_pool_batch(seq_lens, query_lens, seed=0):
    """A random fp8 pool over shuffled blocks, bf16 queries, and the scales as device tensors."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_needed = [-(-length // BLOCK_SIZE) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 64
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_scale = torch.tensor(K_SCALE, device="cuda")
    v_scale = torch.tensor(V_SCALE, device="cuda")
    k_cache = quantize_kv_ref(torch.randn(shape, generator=gen, device="cuda") * 3, k_scale, FP8)
    v_cache = quantize_kv_ref(torch.randn(shape, generator=gen, device="cuda") * 2, v_scale, FP8)
    block_tables = shuffled_block_tables(blocks_needed, num_blocks, gen)
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen, device="cuda").bfloat16()
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    args = (query, k_cache, v_cache, block_tables, lengths, starts.cuda(),
            max(query_lens), max(seq_lens), HEAD_DIM ** -0.5)
    return args, query.float(), k_scale, v_scale  # the reference gets the same (bf16-rounded) query


def test_cache_write_of_4096_bf16_tokens_stores_the_references_codes():
    gen = torch.Generator(device="cuda").manual_seed(0)
    num_tokens, num_blocks = 4096, 300
    key = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda") * 5).bfloat16()
    value = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen, device="cuda") * 20).bfloat16()
    slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device="cuda")[:num_tokens]
    slots[::97] = -1
    k_scale, v_scale = torch.tensor(K_SCALE, device="cuda"), torch.tensor(V_SCALE, device="cuda")
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache, v_cache = torch.zeros(shape, dtype=FP8, device="cuda"), torch.zeros(shape, dtype=FP8, device="cuda")
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    kernels.write_kv_cache_ref(key, value, k_expected, v_expected, slots, k_scale, v_scale)
    kernels.write_kv_cache(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    for actual, expected in ((k_cache, k_expected), (v_cache, v_expected)):
        difference = (actual.view(torch.uint8).int() - expected.view(torch.uint8).int()).abs()
        assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3
    assert v_expected.float().abs().max() == 448.0  # values saturate: 20 sigma / 0.015 > 448


@pytest.mark.parametrize("bound_max_seq_len", [True, False])
def test_fp8_decode_batch_of_64_up_to_4096_tokens(bound_max_seq_len):
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, 4097, (64,), generator=gen).tolist()
    seq_lens[:3] = [1, 4096, 17]
    args, query, k_scale, v_scale = _fp8_pool_batch(seq_lens, [1] * 64)
    query_bf16, k_cache, v_cache, block_tables, lengths, _, _, max_seq_len, scale = args
    out = kernels.paged_decode_attention(query_bf16, k_cache, v_cache, block_tables, lengths, scale,
                                         max_seq_len if bound_max_seq_len else None, k_scale=k_scale,
                                         v_scale=v_scale)
    expected = kernels.paged_decode_attention_ref(query, k_cache, v_cache, block_tables, lengths, scale,
                                                  None, k_scale=k_scale, v_scale=v_scale)
    assert out.dtype == torch.bfloat16
    assert_close_half(out, expected)


def test_fp8_prefill_chunked_prefill_and_decode_in_one_step():
    seq_lens = [4096, 3000, 700, 1, 129, 2048]
    query_lens = [4096, 512, 700, 1, 1, 300]
    args, query, k_scale, v_scale = _fp8_pool_batch(seq_lens, query_lens)
    out = kernels.paged_attention(*args, k_scale=k_scale, v_scale=v_scale)
    expected = kernels.paged_attention_ref(query, *args[1:], k_scale=k_scale, v_scale=v_scale)
    assert_close_half(out, expected)


def test_fp8_decode_in_a_cuda_graph_reads_the_scales_on_the_device():
    args, query, k_scale, v_scale = _fp8_pool_batch([300, 2000, 4000, 50], [1] * 4)
    query_bf16, k_cache, v_cache, block_tables, lengths, _, _, _, scale = args

    def decode():
        return kernels.paged_decode_attention(query_bf16, k_cache, v_cache, block_tables, lengths, scale,
                                              4096, k_scale=k_scale, v_scale=v_scale)

    for _ in range(2):
        decode()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode()
    v_scale.mul_(2)  # a new value in the same tensor: the replay must see it
    graph.replay()
    expected = kernels.paged_decode_attention_ref(query, k_cache, v_cache, block_tables, lengths, scale,
                                                  None, k_scale=k_scale, v_scale=v_scale)
    assert_close_half(out, expected)
