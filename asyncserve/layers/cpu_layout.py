"""The CPU's one-row products: which memory layout of a weight its BLAS multiplies fastest by one row.

Batch-1 decode on a CPU streams every weight from memory once per token through a single-threaded
matrix-vector product. MKL reads a column-major weight (stored [in, out]) about 1.5x faster than the
row-major [out, in] that checkpoints hold (measured on an AMD EPYC, float32), and for a few rows at
about the same speed as before. Other libraries and CPUs may differ, so, as the GPU times its one-row
kernels, the CPU times both layouts per weight shape at start-up and keeps the faster. The weight stays
the same [out, in] tensor to every reader; only its strides change.
"""
from __future__ import annotations

import time

import torch
from torch.nn import functional as F

# A one-row product over a smaller weight costs a few microseconds of dispatch whatever its layout:
# timing it would pick a layout by noise, so it keeps the layout it was loaded in.
MIN_TIMED_BYTES = 1 << 20
# Time over enough copies of a weight that the caches cannot hold them, as the model reads it.
_COLD_BYTES = 64 << 20
_MAX_COPIES = 64
# Column-major must win by this much: timing noise must not flip a layout that barely matters.
_MIN_GAIN = 0.9


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [out, in] values, stored as [in, out] (a transposed view of a contiguous copy)."""
    return weight.t().contiguous().t()


def is_column_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.shape[0] > 1


def _elapsed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@torch.inference_mode()
def time_one_row_layouts(weight: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
    """(row-major ms, column-major ms) of x[1, in] @ weight^T on this CPU, weights read cold."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype)
    num_copies = max(1, min(_MAX_COPIES, _COLD_BYTES // (weight.numel() * weight.element_size())))
    rows = [weight.contiguous()] + [weight.contiguous().clone() for _ in range(num_copies - 1)]
    columns = [column_major(copy) for copy in rows]

    def over(copies):
        def run():
            for copy in copies:
                F.linear(x, copy)
        return run

    # The best of several runs, alternating: other processes only ever add time, and a busy moment of
    # the machine hurts both layouts alike.
    row_time = column_time = float("inf")
    for _ in range(repeats):
        row_time = min(row_time, _elapsed(over(rows)))
        column_time = min(column_time, _elapsed(over(columns)))
    return row_time * 1e3 / num_copies, column_time * 1e3 / num_copies


def prefers_column_major(row_ms: float, column_ms: float) -> bool:
    return column_ms < _MIN_GAIN * row_ms
