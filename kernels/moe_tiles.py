"""The tiles a fused-MoE grouped GEMM launches with, and the hand-written table used where no tuned file
(`moe_tuned.py`) covers the GPU and shape.

Both GEMMs of a layer share BLOCK_M (the align step pads each expert's entries to it once), while the rest
may differ: w13 is [2I x H] and w2 is [H x I], so their best N and K tiles are not the same."""

from typing import NamedTuple

import torch


class GemmTiles(NamedTuple):
    """One grouped GEMM's launch: Triton's tile sizes, GROUP_M row blocks per L2 swizzle group, and the
    compiler's warps and software-pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


class MoeTiles(NamedTuple):
    """A layer's two launches: gate|up (`w13`) and down (`w2`), with the same block_m."""

    w13: GemmTiles
    w2: GemmTiles


# Tiles by the rows each used expert sees on average, (M * top_k) / min(M * top_k, E); the first row
# whose bound is >= it: (max_rows, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
# Few rows per expert is a memory-bound stream of the used experts' weights (narrow tiles for more
# programs, deep K); many rows is an H100 tensor-core GEMM per expert (wide tiles, GROUP_M for L2 reuse
# of a weight tile across an expert's row blocks). Shared memory stays under 160 KiB in every row
# (float32 halves BLOCK_K).
MOE_CONFIGS = (
    (4, 16, 64, 128, 1, 4, 4),
    (16, 16, 128, 128, 1, 4, 3),
    (48, 32, 128, 128, 8, 8, 3),
    (160, 64, 128, 64, 8, 8, 4),
    (None, 128, 256, 64, 8, 8, 3),
)
_MIN_PROGRAMS = 512  # narrower N tiles until the real blocks give this many programs (132 SMs)


def cdiv(a, b):
    return -(-a // b)


def max_padded_entries(num_entries, num_experts, block_m):
    """Upper bound on the aligned length: at most min(entries, E) experts pad a partial block."""
    return num_entries + min(num_entries, num_experts) * (block_m - 1)


def moe_config(num_tokens, top_k, num_experts):
    """The MOE_CONFIGS row for a batch of `num_tokens`."""
    entries = num_tokens * top_k
    rows_per_expert = entries / max(1, min(entries, num_experts))
    return next(c for c in MOE_CONFIGS if c[0] is None or rows_per_expert <= c[0])


def used_blocks(num_tokens, top_k, num_experts, block_m):
    """BLOCK_M blocks that can hold entries, at most: what sizes the program count (the rest exit at once)."""
    entries = num_tokens * top_k
    num_blocks = cdiv(max_padded_entries(entries, num_experts, block_m), block_m)
    return min(num_blocks, cdiv(entries, block_m) + min(entries, num_experts))


def table_tiles(row, num_tokens, top_k, num_experts, w13_rows, w2_rows, dtype):
    """A MOE_CONFIGS row made concrete for this batch and layer: BLOCK_N halved (down to 32) until the
    used blocks give _MIN_PROGRAMS programs, BLOCK_K halved for float32 (same shared memory)."""
    _, block_m, block_n, block_k, group_m, num_warps, num_stages = row
    blocks = used_blocks(num_tokens, top_k, num_experts, block_m)
    if dtype == torch.float32:  # exact float32 (no tf32) in tiles of the same shared memory
        block_k = max(16, block_k // 2)

    def for_rows(n):
        width = block_n
        while width > 32 and blocks * cdiv(n, width) < _MIN_PROGRAMS:
            width //= 2
        return GemmTiles(block_m, width, block_k, group_m, num_warps, num_stages)

    return MoeTiles(for_rows(w13_rows), for_rows(w2_rows))
