"""Quantized GEMM/GEMV timings at Llama-3.1-8B projection shapes, next to their floors.

    python scripts/bench_quant_gemm.py                    # W4 g128, M = 1 and 512, default tiles
    python scripts/bench_quant_gemm.py --sweep --bits 8   # also every config in the tables
    python scripts/bench_quant_gemm.py --m 1 16 64 --timed   # what start-up timing tries, per shape
    python scripts/bench_quant_gemm.py --m 1 --timed --mma-sweep   # and more tensor-core tiles

Each GEMV line names its config (BLOCK_N, BLOCK_KP, SPLIT_K, warps, stages, REDUCE): REDUCE False splits K
into an fp32 output with a memset before and a cast after; True meets in the workspace, one kernel.

Each line: our kernel, torch's bf16 matmul on the same problem, and the floor: bytes read /
measured copy bandwidth (memory-bound M) or FLOPs / measured bf16 matmul rate. Weights are
rotated over enough copies that the 50 MB L2 of an H100 cannot hold them (decode reads each
weight once per step), and timed as CUDA-graph replays so launch overhead is left out.
"""
from __future__ import annotations

import argparse

import torch
from triton.testing import do_bench_cudagraph

from asyncserve.kernels import (QUANT_GEMM_CONFIGS, QUANT_GEMV_CONFIGS, QUANT_GEMV_TIMED, GEMV_MAX_ROWS,
                                SPLIT_K_MAX_ROWS, MmaGemvConfig, dequantize_triton, gemv_table_config, mma_applies,
                                pack_int_rows, quant_gemm, quant_gemm_mma, quant_gemm_triton, quant_gemv_triton,
                                reserve_dequant_scratch, reserve_split_k_workspace)
from asyncserve.kernels.quant_gemm import dequant_scratch, gemm_table_config
from asyncserve.layers.quantization.packed_int_timing import ROW_BUCKETS, mma_candidates, split_k_candidates
from bench_common import measure_bandwidth, measure_matmul_rate

SHAPES = {"qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672),
          "down": (14336, 4096)}
COLD_BYTES = 256 << 20
# Tried by --sweep besides the table: its tiles COMPACT, and more (BLOCK_M, BLOCK_N, BLOCK_K,
# GROUP_M, warps, stages) tiles both ways.
_EXTRA_TILES = [(256, 128, 64, 8, 8, 3), (128, 256, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3),
                (128, 128, 64, 8, 4, 4), (64, 128, 128, 8, 4, 4), (16, 32, 256, 8, 4, 4),
                (32, 128, 64, 8, 4, 4)]
EXTRA_GEMM_CONFIGS = ([row[1:-1] + (True,) for row in QUANT_GEMM_CONFIGS]
                      + [tile + (compact,) for tile in _EXTRA_TILES for compact in (False, True)])
DTYPE = torch.bfloat16
# Tried by --timed --mma-sweep besides the candidates: (BLOCK_N, BLOCK_M, SPLIT_K, warps, stages, permute_x)
_MMA_SWEEP = [MmaGemvConfig(n, 16, s, w, st, permute_x) for permute_x in (False, True) for n in (32, 64, 128)
              for s in (1, 2, 4, 8) for w, st in ((4, 3), (4, 4), (8, 3))]


def _copies(make, one_copy_bytes):
    return [make() for _ in range(max(1, min(16, COLD_BYTES // one_copy_bytes)))]


def _time_cold(fn, copies):
    """Milliseconds per call of fn(copy), averaged over a pass through all copies."""
    def run():
        for copy in copies:
            fn(copy)
    return do_bench_cudagraph(run) / len(copies)


def _quantized(k, n, bits, group_size):
    num_groups = -(-k // group_size)
    q = torch.randint(0, 1 << bits, (k, n), device="cuda", dtype=torch.int32)
    return (pack_int_rows(q, bits), (torch.rand(num_groups, n, device="cuda") * 0.02).to(DTYPE),
            torch.randint(0, 1 << bits, (num_groups, n), device="cuda").to(DTYPE))


def bench_shape(name, k, n, m, bits, group_size, copy_rate, matmul_rate, sweep, timed, mma_sweep=False):
    """(our ms with the table's tiles, bf16 ms, our best ms of the start-up-timed configs or None)."""
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    reserve_split_k_workspace(n, x.device)  # as the layers do at load: graph capture allocates nothing
    quant_bytes = k * n * bits // 8 + 2 * 2 * (-(-k // group_size)) * n
    weights = _copies(lambda: _quantized(k, n, bits, group_size), quant_bytes)
    dense = _copies(lambda: torch.randn(k, n, device="cuda", dtype=DTYPE), 2 * k * n)
    io_bytes = 2 * m * (k + n)
    floor_ms = max((quant_bytes + io_bytes) / copy_rate, 2 * m * k * n / matmul_rate) * 1e3
    bf16_ms = _time_cold(lambda w: x @ w, dense)
    ours_ms = _time_cold(lambda w: quant_gemm(x, *w, group_size, bits), weights)
    print(f"{name:<8} M={m:<5} K={k:<6} N={n:<6} W{bits} g{group_size}: {ours_ms * 1e3:8.1f} us "
          f"({(quant_bytes + io_bytes) / ours_ms / 1e6:5.0f} GB/s, "
          f"{2 * m * k * n / ours_ms / 1e9:4.0f} TFLOP/s)  floor {floor_ms * 1e3:7.1f} us  "
          f"torch bf16 {bf16_ms * 1e3:8.1f} us", flush=True)
    gemv = m <= GEMV_MAX_ROWS
    best_timed = None
    if timed and mma_applies(x, bits, group_size):  # the tensor-core product, as start-up timing tries it
        num_sms = torch.cuda.get_device_properties(0).multi_processor_count
        for config in mma_candidates(m, k, n, num_sms) + (_MMA_SWEEP if mma_sweep else []):
            config = config._replace(block_m=max(16, min(config.block_m, 1 << (m - 1).bit_length())))
            ms = _time_cold(lambda w: quant_gemm_mma(x, *w, group_size, bits, config), weights)
            best_timed = ms if best_timed is None else min(best_timed, ms)
            print(f"    timed tensor-core {tuple(config)}: {ms * 1e3:8.1f} us "
                  f"({(quant_bytes + io_bytes) / ms / 1e6:5.0f} GB/s)", flush=True)
    if timed and gemv:
        table = gemv_table_config(n)
        for config in QUANT_GEMV_TIMED:
            ms = _time_cold(lambda w: quant_gemv_triton(x, *w, group_size, bits, config), weights)
            best_timed = min(best_timed, ms) if best_timed is not None else ms
            print(f"    timed {config}{' (table)' if config == table else ''}: {ms * 1e3:8.1f} us", flush=True)
    elif timed and m <= ROW_BUCKETS[-1]:  # what fastest_row_plan weighs for this many rows
        num_sms = torch.cuda.get_device_properties(0).multi_processor_count
        candidates = [(gemm_table_config(m), 1)] + split_k_candidates(m, k, n, group_size, num_sms)
        for config, num_splits in candidates if m <= SPLIT_K_MAX_ROWS else []:
            ms = _time_cold(lambda w: quant_gemm_triton(x, *w, group_size, bits, config, num_splits), weights)
            best_timed = ms if best_timed is None else min(best_timed, ms)
            print(f"    timed GEMM {config} in {num_splits} K-splits: {ms * 1e3:8.1f} us", flush=True)
        reserve_dequant_scratch(k * n, DTYPE, x.device)
        scratch = dequant_scratch(DTYPE, x.device, k * n)
        ms = _time_cold(lambda w: x @ dequantize_triton(*w, group_size, bits, k, scratch), weights)
        best_timed = ms if best_timed is None else min(best_timed, ms)
        print(f"    timed dequantize + cuBLAS: {ms * 1e3:8.1f} us", flush=True)
    if sweep:
        configs = (QUANT_GEMV_CONFIGS if gemv else
                   [c[1:] for c in QUANT_GEMM_CONFIGS] + EXTRA_GEMM_CONFIGS)
        kernel = quant_gemv_triton if gemv else quant_gemm_triton
        for config in configs:
            ms = _time_cold(lambda w: kernel(x, *w, group_size, bits, config), weights)
            print(f"    {config}: {ms * 1e3:8.1f} us", flush=True)
    return ours_ms, bf16_ms, best_timed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--m", type=int, nargs="+", default=[1, 512])
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--sweep", action="store_true", help="time every config of the tables")
    parser.add_argument("--mma-sweep", action="store_true",
                        help="with --timed: also every tensor-core tile of the sweep list (int4, groups of 128)")
    parser.add_argument("--timed", action="store_true",
                        help="for M up to the row plan's last bucket, time what start-up timing tries (on unless "
                             "ASYNCSERVE_QUANT_TUNE=0: GEMV tiles; tensor-core product, table GEMM, K-split GEMMs, "
                             "dequantize + cuBLAS) and total the fastest")
    args = parser.parse_args()
    copy_rate, matmul_rate = measure_bandwidth(), measure_matmul_rate()
    print(f"{torch.cuda.get_device_name()}: copy {copy_rate / 1e9:.0f} GB/s, "
          f"bf16 matmul {matmul_rate / 1e12:.0f} TFLOP/s", flush=True)
    for m in args.m:
        ours_total = bf16_total = timed_total = 0.0
        for name, (k, n) in SHAPES.items():
            ours, bf16, best_timed = bench_shape(name, k, n, m, args.bits, args.group_size, copy_rate,
                                                 matmul_rate, args.sweep, args.timed, args.mma_sweep)
            ours_total, bf16_total = ours_total + ours, bf16_total + bf16
            timed_total += best_timed if best_timed is not None else ours
        # 32 layers of the four projections: the linear part of one 8B decode/prefill step.
        print(f"M={m}: 32 layers of projections {32 * ours_total:.2f} ms "
              f"(torch bf16 {32 * bf16_total:.2f} ms"
              + (f"; the start-up-timed choices {32 * timed_total:.2f} ms" if args.timed and m <= ROW_BUCKETS[-1]
                 else "") + ")", flush=True)


if __name__ == "__main__":
    main()
