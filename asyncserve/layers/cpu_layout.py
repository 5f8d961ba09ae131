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
# Time over enough copies of a weight that the last-level cache cannot hold them, as a model's step
# reads it: each layout's copies fill this much, and the two layouts' passes alternate.
_COLD_BYTES = 32 << 20
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


class OneRowTimer:
    """Times x[1, in] @ weight^T in both layouts over copies of the weight. The copies live in one scratch
    buffer kept for every shape, so its pages are faulted in once (the costly part of start-up timing)."""

    def __init__(self, cold_bytes: int = _COLD_BYTES):
        self.cold_bytes = cold_bytes
        self._scratch = torch.empty(0, dtype=torch.uint8)

    def _copies(self, weight: torch.Tensor, count: int, offset: int, transposed: bool) -> list[torch.Tensor]:
        numel = weight.numel()
        flat = self._scratch[offset:offset + count * numel * weight.element_size()].view(weight.dtype)
        copies = []
        for index in range(count):
            part = flat[index * numel:(index + 1) * numel]
            if transposed:
                copies.append(part.view(weight.shape[1], weight.shape[0]).copy_(weight.t()).t())
            else:
                copies.append(part.view(weight.shape).copy_(weight))
        return copies

    @torch.inference_mode()
    def __call__(self, weight: torch.Tensor, repeats: int = 5) -> tuple[float, float]:
        """(row-major ms, column-major ms) of one product, weights read cold. A weight larger than the
        cold size is timed over its first rows that fit (the speed per byte is what is compared)."""
        row_bytes = weight.shape[1] * weight.element_size()
        part = weight[:max(1, self.cold_bytes // row_bytes)]
        nbytes = part.numel() * part.element_size()
        count = max(1, min(_MAX_COPIES, self.cold_bytes // nbytes))
        if self._scratch.numel() < 2 * count * nbytes:  # both layouts' copies; allocated once
            self._scratch = torch.empty(max(2 * count * nbytes, 2 * self.cold_bytes), dtype=torch.uint8)
        rows = self._copies(part, count, 0, transposed=False)
        columns = self._copies(part, count, count * nbytes, transposed=True)
        x = torch.randn(1, weight.shape[1], dtype=weight.dtype)

        def over(copies):
            def run():
                for copy in copies:
                    F.linear(x, copy)
            return run

        # The best of several runs, alternating: other processes only ever add time, and a busy moment
        # of the machine hurts both layouts alike.
        row_time = column_time = float("inf")
        for _ in range(repeats):
            row_time = min(row_time, _elapsed(over(rows)))
            column_time = min(column_time, _elapsed(over(columns)))
        whole = weight.shape[0] / part.shape[0]
        return row_time * 1e3 * whole / count, column_time * 1e3 * whole / count


def prefers_column_major(row_ms: float, column_ms: float) -> bool:
    return column_ms < _MIN_GAIN * row_ms
