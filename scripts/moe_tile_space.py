"""The tiles scripts/tune_moe.py times for one MoE layer shape and token count: BLOCK_M by the rows each used
expert sees, then N and K tiles, GROUP_M, warps and pipeline stages from a search space of the size asked,
pruned to what fits the GPU and can pay off."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from asyncserve.kernels.moe_tiles import GemmTiles, moe_config, table_tiles

BLOCK_MS = (16, 32, 64, 128)
# Tile options per search-space size, before pruning; "small" is tune_moe.py's default (see its --space). It
# holds what vLLM's H100 file for Qwen3-30B-A3B's experts chose (a kernel of the same design): narrow, deep-
# pipelined tiles at decode, BLOCK_N 256 with 8 warps from ~4 rows an expert, 128 x 256 x 64 for prefill.
SPACES = {
    "tiny": dict(block_n=(64, 128), block_k=(64, 128), group_m=(1,), num_warps=(4,), num_stages=(3, 4)),
    "small": dict(block_n=(32, 64, 128, 256), block_k=(64, 128, 256), group_m=(1, 16), num_warps=(4, 8),
                  num_stages=(3, 4, 5)),
    "medium": dict(block_n=(32, 64, 128, 256), block_k=(64, 128, 256), group_m=(1, 8, 32), num_warps=(4, 8),
                   num_stages=(2, 3, 4, 5)),
    "large": dict(block_n=(16, 32, 64, 128, 256), block_k=(32, 64, 128, 256), group_m=(1, 8, 32),
                  num_warps=(4, 8), num_stages=(2, 3, 4, 5)),
}


@dataclass(frozen=True)
class MoeShape:
    """One rank's MoE layer: E experts of intermediate size I (already divided by tensor parallelism)."""

    name: str
    num_experts: int
    hidden: int
    intermediate: int
    top_k: int


def shape_from_config(name, config, tp=1):
    """A model config's MoE layer (a multimodal config's text_config), its intermediate split over `tp`."""
    config = config.get("text_config") or config
    experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
    if not experts:
        raise SystemExit(f"{name}: no experts in its config (num_experts / num_local_experts)")
    intermediate = config.get("moe_intermediate_size") or config["intermediate_size"]
    if intermediate % tp:
        raise SystemExit(f"{name}: intermediate size {intermediate} does not split over {tp} ranks")
    return MoeShape(name, experts, config["hidden_size"], intermediate // tp, config["num_experts_per_tok"])


def rows_per_expert(num_tokens, top_k, num_experts):
    entries = num_tokens * top_k
    return entries / min(entries, num_experts)


def block_m_options(rows):
    """BLOCK_M worth timing for `rows` per used expert: none over twice the rows (padding rows cost reads of
    A and registers), none so short that an expert's weights stream through many row blocks."""
    fitting = 1 << math.ceil(math.log2(rows))
    return [b for b in BLOCK_MS if min(64, fitting // 4) <= b <= max(BLOCK_MS[0], 2 * fitting)]


def fits(tiles, element_bytes, shared_memory):
    """Whether the pipeline's A and B tiles fit the shared memory and the fp32 accumulator the registers."""
    stage_bytes = (tiles.block_m + tiles.block_n) * tiles.block_k * element_bytes
    accumulator_per_thread = tiles.block_m * tiles.block_n / (32 * tiles.num_warps)
    return tiles.num_stages * stage_bytes <= shared_memory and accumulator_per_thread <= 128


def gemm_space(block_m, rows, n, k, element_bytes, shared_memory, size="small"):
    """The candidate tiles of one GEMM (N outputs, K inputs) at one BLOCK_M, pruned: tiles no wider than
    the matrix, no more pipeline stages than K steps (+1), shared memory and registers, GROUP_M > 1 only where an
    expert has several row blocks (its weight tile is then reused from L2), 8 warps only for tiles of
    64 x 64 or more."""
    options = SPACES[size]
    widest_n, deepest_k = max(16, 1 << (n - 1).bit_length()), max(16, 1 << (k - 1).bit_length())
    group_ms = options["group_m"] if rows > block_m else (1,)
    space = []
    for block_n, block_k, group_m, num_warps, num_stages in itertools.product(
            options["block_n"], options["block_k"], group_ms, options["num_warps"], options["num_stages"]):
        block_n, block_k = min(block_n, widest_n), min(block_k, deepest_k)
        tiles = GemmTiles(block_m, block_n, block_k, group_m, num_warps, min(num_stages, -(-k // block_k) + 1))
        if num_warps > 4 and block_m * block_n < 64 * 64:
            continue
        if tiles not in space and fits(tiles, element_bytes, shared_memory):
            space.append(tiles)
    return space


def candidate_tiles(shape, num_tokens, dtype, shared_memory, space):
    """{gemm: [tiles, ...]} to time at `num_tokens`: the search space at each BLOCK_M worth trying, and the
    MOE_CONFIGS row's tiles (first: the baseline the tuned entry is compared with)."""
    rows = rows_per_expert(num_tokens, shape.top_k, shape.num_experts)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    table = table_tiles(moe_config(num_tokens, shape.top_k, shape.num_experts), num_tokens, shape.top_k,
                        shape.num_experts, 2 * shape.intermediate, shape.hidden, dtype)
    dims = {"w13": (2 * shape.intermediate, shape.hidden), "w2": (shape.hidden, shape.intermediate)}
    candidates = {"w13": [table.w13], "w2": [table.w2]}
    for block_m in block_m_options(rows):
        for gemm, (n, k) in dims.items():
            candidates[gemm] += [t for t in gemm_space(block_m, rows, n, k, element_bytes, shared_memory, space)
                                 if t not in candidates[gemm]]
    return candidates
