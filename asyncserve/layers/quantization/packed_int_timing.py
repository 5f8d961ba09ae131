"""Start-up timing of a packed-integer (GPTQ/AWQ) weight's products on this GPU, per weight shape.

Few rows are bound by reading the packed weight, so what decides their speed is how many programs stream it
at once: the table's tiles were chosen in one H100 sweep, and for 5-128 rows they leave most SMs idle
(N / BLOCK_N column tiles, one program each). Timing the candidates once per shape at start-up (well under
a second of GPU time; one Triton compile per tile shape) keeps what is fastest here: the one-row GEMV's
tiles or the tensor-core product (kernels/quant_gemv_mma.py: int4 in 128-row groups), and for each row bucket
a K-split GEMM, the table's GEMM, the tensor-core product or dequantization into the scratch + cuBLAS (past
SPLIT_K_MAX_ROWS rows, prefill's: the tensor-core product in row tiles without K-splits, or dequantization).
"""
from __future__ import annotations

import os

import torch

from asyncserve.kernels import (GEMV_MAX_ROWS, MMA_TILE_ROWS, QUANT_GEMV_TIMED, SPLIT_K_MAX_ROWS, MmaGemvConfig,
                                gemv_table_config, mma_applies, quant_gemm_mma, quant_gemv_triton)
from asyncserve.kernels.quant_gemm import (dequant_scratch, dequantize_triton, gemm_table_config, quant_gemm,
                                           quant_gemm_triton)
from asyncserve.kernels.quant_gemv_mma import K_TILE
from asyncserve.layers.single_row import cold_timer, fastest

# The tensor-core product is among the candidates (Ampere or newer: bf16 MMA) unless ASYNCSERVE_QUANT_MMA=0:
# on an H100 its GPU tests passed and timing chose it for 8-64 rows of the 8B's projections, 1.4-1.9x
# faster than what it replaced at 16 rows (docs/benchmarks.md, ninth session); one row keeps the GEMV.
MMA_CANDIDATES = os.environ.get("ASYNCSERVE_QUANT_MMA", "1") != "0"
# Its form with x reordered once per call joins them unless ASYNCSERVE_QUANT_MMA_PERMUTE_X=0. Not yet run on a
# GPU (interpreter-tested); compiled for sm_90a its loop has no barrier (x reaches shared memory by pipelined
# asynchronous copies) and 350-373 instructions per 128-deep tile at 16-64 rows, where the gathered form has 16
# barriers and 404 (docs/benchmarks.md, tenth session). Timing keeps it only where it measures faster.
PERMUTED_X_CANDIDATES = os.environ.get("ASYNCSERVE_QUANT_MMA_PERMUTE_X", "1") != "0"


def _mma_usable(x: torch.Tensor, bits: int, group_size: int) -> bool:
    return (MMA_CANDIDATES and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and mma_applies(x, bits, group_size))


# The row counts a plan is timed at; rows in (previous, bucket] take that bucket's choice, rows past the last
# dequantization + cuBLAS (where the fused product's unpacking, repeated per row tile, outweighs one dense copy).
ROW_BUCKETS = (8, 16, 32, 64, SPLIT_K_MAX_ROWS, 256, 512, 1024)
DEQUANT = "dequant"  # a plan's choice: dequantize into the scratch, then cuBLAS
# A plan: ((max_rows, choice), ...) by growing max_rows; choice DEQUANT, an MmaGemvConfig or
# (GEMM config, num_splits).
RowPlan = tuple


def mma_candidates(rows: int, k: int, n: int, num_sms: int, permute_x: bool = True) -> list[MmaGemvConfig]:
    """Tensor-core product tiles for `rows` rows: 64 and 128 columns, the rows' power of two (16 to 128), eight
    warps where a tile's two fp32 accumulators would not fit four warps' registers, and as many K-splits as
    fill about two waves of the SMs while each split keeps at least two 128-deep tiles. x gathered in the
    kernel at both widths for one row, at 128 columns past it (the tile that won at 8-32 rows on an H100),
    and with `permute_x` x reordered once per call at both widths. Past SPLIT_K_MAX_ROWS rows, K is not split."""
    block_m = max(16, min(MMA_TILE_ROWS, 1 << (rows - 1).bit_length()))
    k_tiles = k // K_TILE

    def config(block_n: int, permute_x: bool) -> MmaGemvConfig:
        tiles = -(-rows // block_m) * -(-n // block_n)
        split_k = max(1, min(-(-2 * num_sms // tiles), k_tiles // 2)) if rows <= SPLIT_K_MAX_ROWS else 1
        return MmaGemvConfig(block_n, block_m, split_k, 8 if block_n * block_m >= 8192 else 4, 3, permute_x)

    gathered = [config(64, False), config(128, False)] if rows == 1 else [config(128, False)]
    return gathered + ([config(64, True), config(128, True)] if permute_x else [])


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


@torch.inference_mode()
def fastest_quant_gemv_config(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                              bits: int) -> tuple[tuple, float, float]:
    """(config, the table's ms, its ms) for a packed-integer weight's one-row GEMV: the table's own choice
    unless another timed config is at least 5% faster."""
    x = torch.randn(1, qweight.shape[0] * 32 // bits, dtype=scales.dtype, device=qweight.device)
    timed = cold_timer(qweight)
    table = gemv_table_config(qweight.shape[1])
    baseline = timed(lambda w: quant_gemv_triton(x, w, scales, zeros, group_size, bits, table))
    others = [config for config in QUANT_GEMV_TIMED if config != table]
    if _mma_usable(x, bits, group_size):
        others += mma_candidates(1, x.shape[1], qweight.shape[1], _num_sms(qweight.device), PERMUTED_X_CANDIDATES)
    best, best_time = fastest(others, lambda config: timed(  # the dispatcher runs either kind of config
        lambda w: quant_gemm(x, w, scales, zeros, group_size, bits, config)), baseline)
    return best or table, baseline, best_time


def split_k_candidates(rows: int, k: int, n: int, group_size: int, num_sms: int) -> list[tuple[tuple, int]]:
    """(GEMM config, num_splits) pairs for `rows` rows: row tiles of the rows' power of two (16 to 64), 64 and
    128 columns, K tiles of 128 (64 where groups are smaller), and as many K-splits as fill about two waves
    of the SMs while each split keeps at least two K tiles."""
    block_m = max(16, min(64, 1 << (rows - 1).bit_length()))
    block_k = 128 if group_size % 128 == 0 or group_size >= k else 64
    k_tiles = -(-k // block_k)
    candidates = []
    for block_n in (64, 128):
        tiles = -(-rows // block_m) * -(-n // block_n)
        num_splits = max(1, min(-(-2 * num_sms // tiles), k_tiles // 2))
        candidates.append(((block_m, block_n, block_k, 8, 4, 3, False), num_splits))
    return candidates


@torch.inference_mode()
def fastest_row_plan(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                     bits: int) -> tuple[RowPlan, list[tuple[int, str, float, float]]]:
    """(plan, report) for GEMV_MAX_ROWS < rows <= ROW_BUCKETS[-1]: per bucket the fastest of the tensor-core
    product where it applies, dequantization + cuBLAS where the scratch is reserved, and up to SPLIT_K_MAX_ROWS
    rows the table's GEMM and the K-split GEMMs; past them the baseline is what runs without a plan
    (dequantization, or the table's GEMM without a scratch);
    report rows are (bucket, what won, its ms, the baseline's ms)."""
    k, n = qweight.shape[0] * 32 // bits, qweight.shape[1]
    num_sms = _num_sms(qweight.device)
    timed = cold_timer(qweight)
    scratch = dequant_scratch(scales.dtype, qweight.device, k * n)
    plan, report = [], []
    for rows in ROW_BUCKETS:
        x = torch.randn(rows, k, dtype=scales.dtype, device=qweight.device)
        table = (gemm_table_config(rows), 1)
        if rows <= SPLIT_K_MAX_ROWS:
            gemms = [table] + split_k_candidates(rows, k, n, group_size, num_sms)
        else:  # past the workspace's rows: no K-splits; the table's GEMM only where nothing dequantizes
            gemms = [] if scratch is not None else [table]
        times = {}
        for config, num_splits in gemms:
            times[(config, num_splits)] = timed(lambda w, c=config, s=num_splits: quant_gemm_triton(
                x, w, scales, zeros, group_size, bits, c, s))
        if _mma_usable(x, bits, group_size):
            for config in mma_candidates(rows, k, n, num_sms, PERMUTED_X_CANDIDATES):
                times[config] = timed(lambda w, c=config: quant_gemm_mma(x, w, scales, zeros, group_size, bits, c))
        if scratch is not None:
            times[DEQUANT] = timed(lambda w: x @ dequantize_triton(w, scales, zeros, group_size, bits, k, scratch))
        baseline = table if table in times else DEQUANT
        best = min(times, key=times.get)
        plan.append((rows, best))
        report.append((rows, _choice_name(best), times[best], times[baseline]))
    assert ROW_BUCKETS[0] > GEMV_MAX_ROWS
    return tuple(plan), report


def _choice_name(choice) -> str:
    if choice == DEQUANT:
        return DEQUANT
    if isinstance(choice, MmaGemvConfig):
        return (f"tensor-core {choice.block_m}x{choice.block_n}" + (" (x reordered)" if choice.permute_x else "")
                + (f" in {choice.split_k} K-splits" if choice.split_k > 1 else ""))
    config, num_splits = choice
    return f"GEMM {config[0]}x{config[1]}x{config[2]}" + (f" in {num_splits} K-splits" if num_splits > 1 else "")
