"""Shared by the GPU kernel tests: the closeness check of half-precision outputs against fp32 references,
and block tables over shuffled pool blocks."""
from __future__ import annotations

import torch


def assert_close_half(actual, expected, dtype=torch.bfloat16):
    """Norm-wise relative error under 1e-2, and elementwise within a few half-precision ulps."""
    actual, expected = actual.float(), expected.float()
    relative = (actual - expected).norm() / expected.norm()
    assert relative < 1e-2, f"relative error {relative:.2e}"
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


def shuffled_block_tables(blocks_needed: list[int], num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [num_seqs, max blocks] on the GPU: each sequence's blocks drawn from a permutation of the pool."""
    order = torch.randperm(num_blocks, generator=gen, device="cuda").to(torch.int32)
    block_tables = torch.zeros(len(blocks_needed), max(blocks_needed), dtype=torch.int32, device="cuda")
    used = 0
    for seq, count in enumerate(blocks_needed):
        block_tables[seq, :count] = order[used:used + count]
        used += count
    return block_tables
