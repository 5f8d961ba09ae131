"""MXFP4 dequantization against transformers' own (its GPT-OSS integration), on random blocks and scales."""

import pytest
import torch

from asyncserve.kernels.mxfp4 import FP4_E2M1_VALUES, dequantize_mxfp4


def _random_packed(shape, seed=0):
    """uint8 blocks [*shape, 16] and scales [*shape] around the exponent bias (2^-8 .. 2^7)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(119, 135, tuple(shape), generator=gen, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_transformers_dequantization(dtype):
    """transformers dequantizes [E, rows, G, 16] to [E, G * 32, rows] (its experts' transposed layout)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_packed((3, 10, 4))
    expected = convert_moe_packed_tensors(blocks, scales, dtype=dtype)
    out = dequantize_mxfp4(blocks, scales, dtype)
    assert out.shape == (3, 10, 128) and out.dtype == dtype
    assert torch.equal(out.transpose(1, 2), expected)


def test_low_nibble_first_and_the_scale_is_a_power_of_two():
    blocks = torch.tensor([[[0x71] + [0] * 15]], dtype=torch.uint8)  # low nibble 1 (0.5), high 7 (6.0)
    scales = torch.tensor([[129]], dtype=torch.uint8)  # 2^2
    out = dequantize_mxfp4(blocks, scales, torch.float32)  # [1, 32]: one row of one group
    assert out[0, :2].tolist() == [0.5 * 4, 6.0 * 4]
    assert out[0, 2:].abs().sum() == 0
    assert len(FP4_E2M1_VALUES) == 16


def test_chunks_cover_every_group(monkeypatch):
    from asyncserve.kernels import mxfp4
    blocks, scales = _random_packed((5, 7), seed=1)
    whole = dequantize_mxfp4(blocks, scales, torch.float32)
    monkeypatch.setattr(mxfp4, "_MAX_CHUNK_BYTES", 16 * 3)  # 3 groups a chunk: 35 groups in 12 chunks
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), whole)


def test_mismatched_shapes_are_refused_with_both_shapes():
    blocks, scales = _random_packed((2, 4))
    with pytest.raises(ValueError, match=r"\(2, 4, 16\) do not fit scales of shape \(2, 3\)"):
        dequantize_mxfp4(blocks, scales[:, :3], torch.float32)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_mxfp4(blocks.int(), scales, torch.float32)
