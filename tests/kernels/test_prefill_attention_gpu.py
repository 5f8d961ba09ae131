"""Prefill kernels at real shapes on a GPU: v1, v2 with every tile of its table, and the torch path,
bf16/fp16 against the fp32 reference."""

import pytest
import torch

from asyncserve.kernels import paged_attention_ref
from asyncserve.kernels.attention_prefill import paged_prefill_attention_v1
from asyncserve.kernels.attention_prefill_gqa import PREFILL_TILES, paged_prefill_attention_gqa
from asyncserve.kernels.attention_prefill_sdpa import paged_prefill_attention_sdpa, sdpa_prefill_applies
from asyncserve.kernels.kv_scale import FP8_KV_DTYPE
from tests.kernels.gpu_checks import assert_close_half, shuffled_block_tables

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

BLOCK_SIZE = 16


def _batch(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, dtype, kv_dtype=None, seed=0):
    """(args, fp32 reference args) over a pool of shuffled blocks."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    blocks_needed = [-(-length // BLOCK_SIZE) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 16
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device="cuda").to(kv_dtype or dtype)
    v_cache = torch.randn(shape, generator=gen, device="cuda").to(kv_dtype or dtype)
    block_tables = shuffled_block_tables(blocks_needed, num_blocks, gen)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen, device="cuda")
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    lengths = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    args = (query.to(dtype), k_cache, v_cache, block_tables, lengths, starts, max(query_lens),
            max(seq_lens), head_dim ** -0.5)
    return args, (query, k_cache.float(), v_cache.float()) + args[3:]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kernel", [paged_prefill_attention_v1, paged_prefill_attention_gqa])
def test_llama_8b_chunks_prompts_and_decodes_in_one_step(dtype, kernel):
    seq_lens = [8192, 4096, 3000, 700, 1, 129]
    query_lens = [2048, 4096, 512, 700, 1, 1]  # a chunk after 6k of context, whole prompts, decodes
    args, reference_args = _batch(seq_lens, query_lens, 32, 8, 128, dtype)
    assert_close_half(kernel(*args), paged_attention_ref(*reference_args), dtype)


@pytest.mark.parametrize("key", sorted(k for k in PREFILL_TILES if k[1] == 2))
def test_every_half_precision_tile_of_the_table_compiles_and_matches(key):
    head_dim, _, long = key
    query_len = 1100 if long else 300
    args, reference_args = _batch([query_len + 77, 40], [query_len, 40], 16, 4, head_dim, torch.bfloat16)
    out = paged_prefill_attention_gqa(*args, tile=PREFILL_TILES[key], sliding_window=500, softcap=30.0)
    expected = paged_attention_ref(*reference_args, sliding_window=500, softcap=30.0)
    assert_close_half(out, expected)


def test_fp8_pool_at_real_shape():
    args, reference_args = _batch([3000, 600], [1000, 600], 32, 8, 128, torch.bfloat16, kv_dtype=FP8_KV_DTYPE)
    scales = dict(k_scale=torch.tensor(0.5, device="cuda"), v_scale=torch.tensor(2.0, device="cuda"))
    out = paged_prefill_attention_gqa(*args, **scales)
    assert_close_half(out, paged_attention_ref(*reference_args, **scales))


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("context", [0, 3000])
def test_torch_path_matches_for_one_long_sequence(backend, context):
    args, reference_args = _batch([context + 2048], [2048], 32, 8, 128, torch.bfloat16)
    assert sdpa_prefill_applies(args[0], args[1], args[5], args[6])
    try:
        out = paged_prefill_attention_sdpa(*args, backend=backend)
    except RuntimeError as exc:  # a torch build without this fused kernel
        pytest.skip(f"torch's {backend} attention is unavailable: {exc}")
    assert_close_half(out, paged_attention_ref(*reference_args))
