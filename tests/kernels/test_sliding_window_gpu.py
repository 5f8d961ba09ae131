"""Sliding-window and soft-capped paged attention at Gemma-2-9B's shapes on a GPU (head_dim 256,
16 query heads over 8 KV heads, window 4096, soft cap 50, contexts up to 8k), bf16/fp16 against
the fp32 reference; and the Gemma ops at its hidden size."""

import pytest
import torch

import asyncserve.kernels as kernels
from tests.kernels.gpu_checks import assert_close_half, shuffled_block_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 256, 16
WINDOW, SOFTCAP, SCALE = 4096, 50.0, 256 ** -0.5
HALF_DTYPES = [torch.bfloat16, torch.float16]
OPTIONS = {"sliding_window": WINDOW, "softcap": SOFTCAP}



def _pool_batch(seq_lens, query_lens, dtype, seed=0):
    """Random pool with shuffled block ids; the fp32 copies feed the reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_needed = [-(-length // BLOCK_SIZE) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 16
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    block_tables = shuffled_block_tables(blocks_needed, num_blocks, gen)
    # Scores of several units before the cap (scale 1/16 over 256 dims): the cap matters.
    query = 4 * torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=gen, device="cuda")
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lengths = torch.tensor(seq_lens, dtype=torch.int32)
    args = (query.to(dtype), k_cache, v_cache, block_tables, lengths.cuda(), starts.cuda(),
            max(query_lens), max(seq_lens), SCALE)
    reference_args = (query.to(dtype).float(), k_cache.float(), v_cache.float()) + args[3:]
    return args, reference_args


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_decode_batch_up_to_8k_tokens_with_window_and_softcap(dtype):
    gen = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, 8193, (48,), generator=gen).tolist()
    seq_lens[:5] = [1, 8192, 4096, 4097, 5000]
    args, reference_args = _pool_batch(seq_lens, [1] * 48, dtype)
    query, k_cache, v_cache, block_tables, lengths, _, _, max_seq_len, scale = args
    out = kernels.paged_decode_attention(query, k_cache, v_cache, block_tables, lengths, scale,
                                         max_seq_len, **OPTIONS)
    expected = kernels.paged_decode_attention_ref(*reference_args[:5], scale, **OPTIONS)
    assert out.dtype == dtype
    assert_close_half(out, expected, dtype)
    unwindowed = kernels.paged_decode_attention_ref(*reference_args[:5], scale, softcap=SOFTCAP)
    assert not torch.allclose(out[1].float(), unwindowed[1], atol=0.1)  # the window cut the 8k one


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_prefill_chunks_and_decodes_up_to_8k_with_window_and_softcap(dtype):
    seq_lens = [8192, 6000, 4100, 1, 700, 5000]
    query_lens = [2048, 1000, 4100, 1, 700, 1]  # chunks after long context, a whole prompt, decodes
    args, reference_args = _pool_batch(seq_lens, query_lens, dtype)
    out = kernels.paged_attention(*args, **OPTIONS)
    assert_close_half(out, kernels.paged_attention_ref(*reference_args, **OPTIONS), dtype)


def test_full_attention_layers_of_the_same_shapes_still_match():
    """Gemma's global layers: head_dim 256, soft cap, no window."""
    args, reference_args = _pool_batch([6000, 300, 1], [1000, 300, 1], torch.bfloat16)
    out = kernels.paged_attention(*args, softcap=SOFTCAP)
    assert_close_half(out, kernels.paged_attention_ref(*reference_args, softcap=SOFTCAP), torch.bfloat16)


def test_float32_at_head_dim_256_fits_and_matches():
    """fp32 tiles are twice as large: the kernels must still launch within shared memory."""
    args, reference_args = _pool_batch([3000, 700, 1], [1000, 700, 1], torch.float32)
    out = kernels.paged_attention(*args, **OPTIONS)
    torch.testing.assert_close(out, kernels.paged_attention_ref(*reference_args, **OPTIONS),
                               atol=1e-3, rtol=1e-3)
    decode_args, decode_reference = _pool_batch([5000, 17], [1, 1], torch.float32)
    torch.testing.assert_close(kernels.paged_attention(*decode_args, **OPTIONS),
                               kernels.paged_attention_ref(*decode_reference, **OPTIONS), atol=1e-3, rtol=1e-3)


def test_windowed_decode_replays_in_a_cuda_graph_with_new_lengths():
    args, _ = _pool_batch([300, 5000, 8000, 50], [1] * 4, torch.bfloat16)
    query, k_cache, v_cache, block_tables, lengths, _, _, _, scale = args

    def decode():
        return kernels.paged_decode_attention(query, k_cache, v_cache, block_tables, lengths,
                                              scale, max_seq_len=8192, **OPTIONS)

    decode()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = decode()
    lengths.copy_(torch.tensor([1, 8000, 4097, 2], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured_out, decode())


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gemma_norm_and_gelu_at_gemma_2_9b_hidden_size(dtype):
    hidden, intermediate = 3584, 14336
    x = torch.randn(33, hidden, device="cuda").to(dtype)
    residual = torch.randn(33, hidden, device="cuda").to(dtype)
    weight = (0.3 * torch.randn(hidden, device="cuda")).to(dtype)
    out, new_residual = kernels.fused_add_rms_norm(x, residual, weight, 1e-6, unit_offset=True)
    expected, expected_residual = kernels.fused_add_rms_norm_ref(x, residual, weight, 1e-6, unit_offset=True)
    assert torch.equal(new_residual, expected_residual)
    assert_close_half(out, expected, dtype)
    gate_up = torch.randn(33, 2 * intermediate, device="cuda").to(dtype)
    assert_close_half(kernels.gelu_tanh_and_mul(gate_up), kernels.gelu_tanh_and_mul_ref(gate_up.float()), dtype)
