"""`key_ends` in the prefill kernels at Gemma 3's shapes on a GPU (256-token images, a 1024-token window on
local layers), bf16 against the fp32 reference, and through `paged_attention`'s dispatch."""

import pytest
import torch

from asyncserve.kernels import paged_attention, paged_attention_ref
from asyncserve.kernels.attention_prefill import paged_prefill_attention_v1
from asyncserve.kernels.attention_prefill_gqa import paged_prefill_attention_gqa
from tests.kernels.gpu_checks import assert_close_half, shuffled_block_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BLOCK_SIZE = 16
# A whole prompt of two images, a chunk after 1800 cached tokens whose first image began in the cache (a
# cache hit ended inside it), a decode, and a short prompt that ends with its image.
SEQ_LENS = [2000, 3300, 500, 300]
QUERY_LENS = [2000, 1500, 1, 300]
IMAGES = [[(10, 266), (600, 856)], [(1700, 1956), (2900, 3156)], [], [(44, 300)]]


def _batch(num_heads, num_kv_heads, head_dim, seed=0):
    """(bf16 args, fp32 reference args, key_ends) over a pool of shuffled blocks."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_needed = [-(-length // BLOCK_SIZE) for length in SEQ_LENS]
    num_blocks = sum(blocks_needed) + 16
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda").bfloat16()
    v_cache = torch.randn(shape, generator=gen, device="cuda").bfloat16()
    block_tables = shuffled_block_tables(blocks_needed, num_blocks, gen)
    query = torch.randn(sum(QUERY_LENS), num_heads, head_dim, generator=gen, device="cuda")
    starts = torch.tensor([0] + torch.tensor(QUERY_LENS).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    lengths = torch.tensor(SEQ_LENS, dtype=torch.int32, device="cuda")
    args = (query.bfloat16(), k_cache, v_cache, block_tables, lengths, starts, max(QUERY_LENS), max(SEQ_LENS),
            head_dim ** -0.5)
    ends = []
    for seq_len, query_len, spans in zip(SEQ_LENS, QUERY_LENS, IMAGES):
        positions = torch.arange(seq_len - query_len, seq_len)
        seq_ends = positions + 1
        for start, end in spans:
            seq_ends[(positions >= start) & (positions < end)] = end
        ends.append(seq_ends)
    reference_args = (query, k_cache.float(), v_cache.float()) + args[3:]
    return args, reference_args, torch.cat(ends).cuda()


# Gemma 3 27B (32 query heads over 16 KV heads of 128) and 4B (8 over 4, of 256).
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(32, 16, 128), (8, 4, 256)])
@pytest.mark.parametrize("window", [None, 1024])
@pytest.mark.parametrize("kernel", [paged_prefill_attention_gqa, paged_prefill_attention_v1])
def test_gemma3_image_steps_match_reference(kernel, window, num_heads, num_kv_heads, head_dim):
    args, reference_args, key_ends = _batch(num_heads, num_kv_heads, head_dim)
    out = kernel(*args, sliding_window=window, key_ends=key_ends)
    assert_close_half(out, paged_attention_ref(*reference_args, sliding_window=window, key_ends=key_ends))


def test_paged_attention_runs_image_steps_on_the_kernel():
    args, reference_args, key_ends = _batch(32, 16, 128)
    out = paged_attention(*args, sliding_window=1024, key_ends=key_ends)
    assert_close_half(out, paged_attention_ref(*reference_args, sliding_window=1024, key_ends=key_ends))
    causal = paged_attention(*args, sliding_window=1024)
    assert not torch.allclose(out[10:266].float(), causal[10:266].float(), atol=3e-2)
