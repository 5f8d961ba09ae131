"""Compiles a MoE layer's candidate GEMM kernels in worker processes before scripts/tune_moe.py times them:
compiling is most of a tuning's time, and Triton's disk cache hands the binaries to the timing process."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import time

import torch

from asyncserve.kernels.moe import moe_gemm


def compile_chunk(shape, dtype, gemm, tiles_list):
    """In a worker process: compiles one GEMM's kernel for each of `tiles_list` from meta tensors of the
    real strides (Triton's disk cache keeps the binaries for the timing process); returns the failures."""
    entries, meta = 64, {"device": "meta"}
    h, i = shape.hidden, shape.intermediate
    k, n, top_k, mul_weight = (h, 2 * i, shape.top_k, False) if gemm == "w13" else (i, h, 1, True)
    a = torch.empty(entries, k, dtype=dtype, **meta)
    b = torch.empty(shape.num_experts, n, k, dtype=dtype, **meta)
    out = torch.empty(entries, n, dtype=dtype, **meta)
    weights = torch.empty(entries, dtype=torch.float32, **meta)
    failures = []
    for tiles in tiles_list:
        sorted_ids = torch.empty(entries * tiles.block_m, dtype=torch.int32, **meta)
        expert_ids = torch.empty(entries, dtype=torch.int32, **meta)
        num_post = torch.empty(1, dtype=torch.int32, **meta)
        try:
            moe_gemm(a, b, None, out, weights, sorted_ids, expert_ids, num_post, top_k, mul_weight, tiles,
                     compile_only=True)
        except Exception as error:
            failures.append(f"{gemm} {tuple(tiles)}: {type(error).__name__}: {str(error)[:200]}")
    return failures


def precompile(shape, dtype, tiles_by_gemm, jobs, log, timeout_s=900):
    """Compiles every candidate in `jobs` processes, so the timing loop loads binaries instead of compiling
    one at a time (compiling is most of a tuning's time); whatever fails here compiles in the loop."""
    start = time.perf_counter()
    chunks = [(gemm, tiles_list[i:i + 4]) for gemm, tiles in tiles_by_gemm.items()
              for tiles_list in [sorted(tiles)] for i in range(0, len(tiles_list), 4)]
    count = sum(len(tiles) for tiles in tiles_by_gemm.values())
    log(f"  compiling {count} kernels in {jobs} processes ...")
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(compile_chunk, shape, dtype, gemm, tiles) for gemm, tiles in chunks]
        done, pending = concurrent.futures.wait(futures, timeout=timeout_s)
        failures = [line for future in done if future.exception() is None for line in future.result()]
        errors = [future.exception() for future in done if future.exception() is not None]
        log(f"  compiled in {time.perf_counter() - start:.0f} s: {len(failures)} tiles failed, "
            f"{len(errors)} chunks crashed, {len(pending)} timed out" + (f"; first: {failures[0]}" if failures else "")
            + (f"; first crash: {errors[0]!r}" if errors else ""))
    except Exception as error:  # the loop compiles what is missing
        log(f"  precompile failed ({type(error).__name__}: {error}); compiling in the timing loop")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
