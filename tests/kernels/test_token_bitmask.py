"""Grammar bitmasks on the logits: packed int32 words, bit v % 32 of word v // 32 allows token v."""

import pytest
import torch

from asyncserve.kernels import apply_token_bitmask_ref, apply_token_bitmask_triton


def _pack(allowed: torch.Tensor) -> torch.Tensor:
    """[R, V] bool -> [R, ceil(V / 32)] int32, the layout xgrammar and llguidance fill."""
    rows, vocab = allowed.shape
    width = -(-vocab // 32)
    padded = torch.zeros(rows, width * 32, dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(rows, width, 32) << torch.arange(32)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_reference_masks_exactly_the_disallowed_tokens_of_the_listed_rows():
    logits = torch.arange(12.0).view(3, 4).clone()
    allowed = torch.tensor([[True, False, False, True], [False, True, True, False]])
    out = apply_token_bitmask_ref(logits, _pack(allowed), torch.tensor([2, 0]))
    inf = float("-inf")
    assert out.tolist() == [[inf, 1.0, 2.0, inf], [4.0, 5.0, 6.0, 7.0], [8.0, inf, inf, 11.0]]


def test_bit_31_is_token_31_of_its_word():
    logits = torch.zeros(1, 64)
    allowed = torch.zeros(1, 64, dtype=torch.bool)
    allowed[0, 31] = allowed[0, 63] = True
    out = apply_token_bitmask_ref(logits, _pack(allowed), torch.tensor([0]))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [31, 63]


@pytest.mark.parametrize("num_rows,num_masked,vocab", [(5, 3, 37), (4, 4, 2049), (6, 0, 100), (8, 2, 3000)])
def test_triton_matches_reference(triton_device, num_rows, num_masked, vocab):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(num_rows, vocab, generator=generator)
    allowed = torch.rand(num_masked, vocab, generator=generator) < 0.3
    rows = torch.randperm(num_rows, generator=generator)[:num_masked]
    bitmask = _pack(allowed)
    expected = apply_token_bitmask_ref(logits.clone(), bitmask, rows)
    out = apply_token_bitmask_triton(logits.to(triton_device), bitmask.to(triton_device), rows.to(triton_device))
    torch.testing.assert_close(out.cpu(), expected)


def test_reference_masks_all_rows_in_order_like_any_other_order():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 100, generator=generator)
    allowed = torch.rand(4, 100, generator=generator) < 0.5
    in_order = apply_token_bitmask_ref(logits.clone(), _pack(allowed), torch.arange(4))
    reversed_rows = apply_token_bitmask_ref(logits.clone(), _pack(allowed.flip(0)), torch.arange(3, -1, -1))
    assert torch.equal(in_order, reversed_rows)
    assert torch.equal(torch.isfinite(in_order), allowed)
