"""FP8 (e4m3) KV pool: the cache write stores saturate(x / scale), the paged attention kernels read
stored * scale; Triton (interpreted on the CPU) agrees with the torch references at awkward sizes."""

import pytest
import torch

from asyncserve.kernels import (
    paged_attention_ref,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
    write_kv_cache_ref,
    write_kv_cache_triton,
)
from asyncserve.kernels.kv_scale import quantize_kv_ref

FP8 = torch.float8_e4m3fn
TOLERANCE = dict(atol=1e-4, rtol=1e-4)  # the pools hold values up to ~20: fp32 rounding of the sums


def _codes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8).int()


def _assert_same_codes(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact; on a GPU Triton's fp32 division may round the other way right at an e4m3 midpoint
    (a neighbouring code, rarely)."""
    if actual.device.type == "cpu":
        assert torch.equal(_codes(actual), _codes(expected))
        return
    difference = (_codes(actual) - _codes(expected)).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


def _fp8_values_times(scale: float, shape, gen) -> torch.Tensor:
    """Every finite e4m3 value (subnormals included) times `scale`, and some beyond 448 * scale.

    Triton's CPU interpreter rounds fp32 -> e4m3 wrongly (ties away, a lost exponent carry, truncated
    subnormals), so the CPU comparison feeds values that need no rounding; the GPU test rounds."""
    codes = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # NaN codes
    values = codes.view(FP8).float()
    values[..., -2:] = torch.tensor([1000.0, -3000.0])  # saturate to +-448
    return values * scale


def test_reference_write_divides_by_the_scale_and_saturates_at_448():
    key = torch.tensor([[[1.0, -3.0, 112.0, 500.0]]])
    value = torch.tensor([[[0.5, 0.0, -1000.0, 7.0]]])
    k_cache, v_cache = torch.zeros(2, 2, 1, 4, dtype=FP8), torch.zeros(2, 2, 1, 4, dtype=FP8)
    write_kv_cache_ref(key, value, k_cache, v_cache, torch.tensor([3]), k_scale=0.5, v_scale=2.0)
    assert k_cache.float()[1, 1, 0].tolist() == [2.0, -6.0, 224.0, 448.0]  # 1000 saturates to 448
    assert v_cache.float()[1, 1, 0].tolist() == [0.25, 0.0, -448.0, 3.5]
    assert _codes(k_cache)[0].eq(0).all()  # other slots untouched


def test_reference_write_rounds_to_the_nearest_e4m3_value():
    # 1.0625 lies between 1.0 and 1.125 (a tie: even mantissa wins), 1.07 nearer 1.125, 0.001 to the
    # nearest subnormal (2^-9).
    key = torch.tensor([[[1.0625, 1.07, 0.001, -17.0]]])
    k_cache, v_cache = torch.zeros(1, 1, 1, 4, dtype=FP8), torch.zeros(1, 1, 1, 4, dtype=FP8)
    write_kv_cache_ref(key, key, k_cache, v_cache, torch.tensor([0]))
    assert k_cache.float()[0, 0, 0].tolist() == [1.0, 1.125, 2.0 ** -9, -16.0]


@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(1, 16, 8), (3, 80, 8), (8, 128, 16)])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.375, 3.0)], ids=["unscaled", "scaled"])
def test_triton_write_stores_the_references_fp8_codes(triton_device, num_kv_heads, head_dim, block_size,
                                                      scales):
    num_blocks, num_tokens = 5, 11
    gen = torch.Generator().manual_seed(num_kv_heads * head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[[1, 6]] = -1  # padding tokens write nothing
    key = _fp8_values_times(scales[0], (num_tokens, num_kv_heads, head_dim), gen)
    value = _fp8_values_times(scales[1], (num_tokens, num_kv_heads, head_dim), gen)
    k_scale, v_scale = (torch.tensor(s, device=triton_device) if s != 1.0 else s for s in scales)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(FP8).to(triton_device)
    v_cache = torch.randn(shape, generator=gen).to(FP8).to(triton_device)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    args = (key.to(triton_device), value.to(triton_device))
    write_kv_cache_ref(*args, k_expected, v_expected, slots.to(triton_device), k_scale, v_scale)
    write_kv_cache_triton(*args, k_cache, v_cache, slots.to(triton_device), k_scale, v_scale)
    _assert_same_codes(k_cache, k_expected)
    _assert_same_codes(v_cache, v_expected)
    assert k_expected.float().abs().max() == 448.0  # the saturating path was exercised


def test_triton_write_quantizes_a_bf16_key_through_strides(triton_device):
    gen = torch.Generator().manual_seed(3)
    qkv = _fp8_values_times(0.5, (6, 4 + 2 * 2, 32), gen).to(torch.bfloat16).to(triton_device)
    key, value = qkv[:, 4:6], qkv[:, 6:]
    slots = torch.tensor([3, 9, -1, 0, 14, 21], device=triton_device)
    k_cache = torch.zeros(3, 8, 2, 32, dtype=FP8, device=triton_device)
    v_cache = torch.zeros_like(k_cache)
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_expected, v_expected, slots, 0.5, 0.5)
    write_kv_cache_triton(key, value, k_cache, v_cache, slots, 0.5, 0.5)
    _assert_same_codes(k_cache, k_expected)
    _assert_same_codes(v_cache, v_expected)


def _fp8_batch(paged, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, device,
               k_scale, v_scale):
    """A paged batch whose pool holds the e4m3 codes of its random keys/values (NaN poison kept)."""
    batch = paged.build(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size)
    batch.k_cache = quantize_kv_ref(batch.k_cache * 5, k_scale, FP8).to(device)
    batch.v_cache = quantize_kv_ref(batch.v_cache * 5, v_scale, FP8).to(device)
    for name in ("query", "block_tables", "seq_lens", "query_start_loc"):
        setattr(batch, name, getattr(batch, name).to(device))
    return batch


# (num_heads, num_kv_heads, head_dim, block_size): GQA 1/4/8 and a head size that is no power of two.
HEAD_CONFIGS = [(4, 4, 16, 8), (8, 2, 80, 16), (8, 1, 32, 8)]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEAD_CONFIGS)
def test_fp8_prefill_matches_reference(paged, triton_device, num_heads, num_kv_heads, head_dim, block_size):
    k_scale, v_scale = torch.tensor(0.05), torch.tensor(2.5)
    batch = _fp8_batch(paged, [1, 9, 70, 45], [1, 9, 30, 45], num_heads, num_kv_heads, head_dim,
                       block_size, triton_device, k_scale, v_scale)
    k_scale, v_scale = k_scale.to(triton_device), v_scale.to(triton_device)
    out = paged_prefill_attention_triton(*paged.args(batch), k_scale=k_scale, v_scale=v_scale)
    expected = paged_attention_ref(*paged.args(batch), k_scale=k_scale, v_scale=v_scale)
    torch.testing.assert_close(out, expected, **TOLERANCE)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", HEAD_CONFIGS)
def test_fp8_decode_matches_reference_across_partitions(paged, triton_device, num_heads, num_kv_heads,
                                                        head_dim, block_size):
    k_scale, v_scale = torch.tensor(0.05), torch.tensor(2.5)
    batch = _fp8_batch(paged, [1, 17, 200, 333], [1] * 4, num_heads, num_kv_heads, head_dim, block_size,
                       triton_device, k_scale, v_scale)
    k_scale, v_scale = k_scale.to(triton_device), v_scale.to(triton_device)
    args = (batch.query, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    out = paged_decode_attention_triton(*args, None, k_scale, v_scale)  # 333 tokens: three partitions
    torch.testing.assert_close(out, paged_decode_attention_ref(*args, None, k_scale, v_scale), **TOLERANCE)


def test_reference_attends_over_the_dequantized_values(paged):
    # The fp8 pool read with its scales is exactly attention over stored * scale.
    k_scale, v_scale = 0.05, 2.5
    batch = _fp8_batch(paged, [70, 5], [30, 5], 8, 2, 32, 16, "cpu", k_scale, v_scale)
    out = paged_attention_ref(*paged.args(batch), k_scale=k_scale, v_scale=v_scale)
    dense_k = batch.k_cache.float() * k_scale
    dense_v = batch.v_cache.float() * v_scale
    unscaled = paged_attention_ref(batch.query, dense_k, dense_v, *paged.args(batch)[3:])
    torch.testing.assert_close(out, unscaled, **TOLERANCE)


def test_fp8_attention_stays_close_to_the_unquantized_pool(paged):
    # e4m3 keeps 3 mantissa bits: the attention output moves by a few percent, not more.
    batch = paged.build([200, 64, 9], [1, 64, 9], 8, 2, 64, 16)
    exact = paged_attention_ref(*paged.args(batch))
    k_scale, v_scale = 0.01, 0.01
    batch.k_cache = quantize_kv_ref(batch.k_cache, k_scale, FP8)
    batch.v_cache = quantize_kv_ref(batch.v_cache, v_scale, FP8)
    approx = paged_attention_ref(*paged.args(batch), k_scale=k_scale, v_scale=v_scale)
    relative = ((approx - exact).norm() / exact.norm()).item()
    assert 1e-3 < relative < 0.06, relative
