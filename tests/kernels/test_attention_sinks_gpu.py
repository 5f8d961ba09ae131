"""Attention sinks at GPT-OSS-20B/120B's attention shapes on a GPU (64 query heads over 8 KV heads,
head_dim 64, alternating window-128 and full layers, contexts up to 8k), bf16/fp16 against the fp32
reference; and a decode replayed in a CUDA graph reading sinks changed in place."""

import pytest
import torch

from asyncserve import kernels
from tests.kernels.gpu_checks import assert_close_half, shuffled_block_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, WINDOW = 64, 8, 64, 16, 128
SCALE = HEAD_DIM ** -0.5
HALF_DTYPES = [torch.bfloat16, torch.float16]


def _pool_batch(seq_lens, query_lens, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_needed = [-(-length // BLOCK_SIZE) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 16
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    block_tables = shuffled_block_tables(blocks_needed, num_blocks, gen)
    query = 2 * torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen, device="cuda")
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    args = (query.to(dtype), k_cache, v_cache, block_tables, lengths.cuda(), starts.cuda(),
            max(query_lens), max(seq_lens), SCALE)
    reference_args = (query.to(dtype).float(), k_cache.float(), v_cache.float()) + args[3:]
    # Trained sinks span a few units; in the checkpoint's dtype (bf16), as the model holds them.
    sinks = (3 * torch.randn(NUM_HEADS, generator=gen, device="cuda")).to(torch.bfloat16)
    return args, reference_args, sinks


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("window", [WINDOW, None])
def test_decode_batch_up_to_8k_tokens(dtype, window):
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, 8193, (48,), generator=gen).tolist()
    seq_lens[:4] = [1, 8192, 129, 4097]
    args, reference_args, sinks = _pool_batch(seq_lens, [1] * 48, dtype)
    query, k_cache, v_cache, block_tables, lengths, _, _, max_seq_len, scale = args
    options = {"sliding_window": window, "sinks": sinks}
    out = kernels.paged_decode_attention(query, k_cache, v_cache, block_tables, lengths, scale, max_seq_len,
                                         **options)
    assert_close_half(out, kernels.paged_decode_attention_ref(*reference_args[:5], scale, **options), dtype)
    without = kernels.paged_decode_attention_ref(*reference_args[:5], scale, sliding_window=window)
    assert not torch.allclose(out.float(), without, atol=0.05)  # the sinks took weight


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("window", [WINDOW, None])
def test_prefill_chunks_and_decodes_up_to_8k(dtype, window):
    seq_lens = [8192, 6000, 4100, 1, 700, 5000]
    query_lens = [2048, 1000, 4100, 1, 700, 1]
    args, reference_args, sinks = _pool_batch(seq_lens, query_lens, dtype)
    options = {"sliding_window": window, "sinks": sinks}
    out = kernels.paged_attention(*args, **options)
    assert_close_half(out, kernels.paged_attention_ref(*reference_args, **options), dtype)


def test_decode_with_sinks_replays_in_a_cuda_graph_reading_them_on_the_device():
    args, _, sinks = _pool_batch([300, 5000, 8000, 50], [1] * 4, torch.bfloat16)
    query, k_cache, v_cache, block_tables, lengths, _, _, _, scale = args

    def decode():
        return kernels.paged_decode_attention(query, k_cache, v_cache, block_tables, lengths, scale,
                                              max_seq_len=8192, sliding_window=WINDOW, sinks=sinks)

    decode()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = decode()
    sinks.copy_(-sinks)
    lengths.copy_(torch.tensor([1, 8000, 4097, 2], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_out, decode())
