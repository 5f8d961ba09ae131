"""One-row products (batch-1 decode) and the start-up timing that picks their kernel per weight shape.

Batch-1 decode reads every weight once per token, so a kernel at half the memory bandwidth on a few
projections costs more than all the attention of a short context. cuBLAS's GEMM picks split-K kernels
that read some weight shapes at half the bandwidth for M == 1; timing the candidates at start-up takes
well under a second and keeps whichever is fastest on this GPU, library version and shape.
"""
from __future__ import annotations

import logging

import torch
from torch.nn import functional as F

from asyncserve.kernels import (GEMV_ACTIVATIONS, GEMV_CONFIGS, HAS_TRITON, fused_add_rms_norm, gelu_tanh_and_mul,
                                gemv_normed_triton, gemv_triton, silu_and_mul)

logger = logging.getLogger("asyncserve")

# How a one-row product runs: None = cuBLAS GEMM, "mv" = cuBLAS matrix-vector, or a Triton GEMV
# config (see asyncserve.kernels.GEMV_CONFIGS).
SingleRowKernel = None | str | tuple


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           single_row: SingleRowKernel = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias), with `single_row`'s kernel when M == 1."""
    if single_row is None or x.shape[0] != 1:
        return F.linear(x, weight, bias)
    if single_row == "mv":
        out = torch.mv(weight, x[0])
        return (out if bias is None else out + bias)[None]
    return gemv_triton(x, weight, bias, single_row)


def linear_gated(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: tuple,
                 activation: str) -> torch.Tensor:
    """weight applied to activation(gate | up) of one row, in one Triton GEMV (`config`)."""
    return gemv_triton(gate_up, weight, bias, config, activation=activation)


def linear_normed(hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None, config: tuple):
    """(weight applied to rms_norm(hidden + residual), hidden + residual) for one row, in one Triton GEMV."""
    return gemv_normed_triton(hidden, residual, norm_weight, eps, weight, bias, config)


_GATED_ACTIVATIONS = {"silu": silu_and_mul, "gelu_tanh": gelu_tanh_and_mul}
assert set(_GATED_ACTIVATIONS) == set(GEMV_ACTIVATIONS)


def time_ms(fn, repeats: int = 30) -> float:
    """GPU milliseconds of `fn` replayed from a CUDA graph, as decode runs it: timed eagerly, a few-microsecond
    kernel measures its host launch (Triton's launcher costs more than cuBLAS's), not what the GPU spends."""
    for _ in range(3):  # compiles and warms up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    del graph
    return start.elapsed_time(end) / repeats


# In the model each weight is read once per step, never from L2: time over enough copies of it
# that the L2 (50 MB on an H100) cannot hold them, or small weights look faster than they run.
_COLD_BYTES = 256 << 20


def cold_timer(weight: torch.Tensor):
    """A function timing `run_one(w)` over copies of `weight` that the L2 cannot hold: ms per copy."""
    num_copies = max(1, min(256, -(-_COLD_BYTES // (weight.numel() * weight.element_size()))))
    copies = [weight] + [weight.clone() for _ in range(num_copies - 1)]

    def timed(run_one) -> float:
        def run():
            for copy in copies:
                run_one(copy)
        return time_ms(run, repeats=5) / len(copies)
    return timed


# A Triton kernel replaces cuBLAS (or a layer's standing path) only when it times at least 5% faster (cold
# weights, graph replays).
_MIN_GAIN = 0.95


def fastest(candidates, time_candidate, baseline_ms: float, margin: float = _MIN_GAIN):
    """(the fastest candidate under `margin` x `baseline_ms`, or None; its ms, or `baseline_ms`): what every
    start-up choice of a kernel keeps. `time_candidate(candidate)` gives its ms."""
    best, best_time = None, margin * baseline_ms
    for candidate in candidates:
        try:
            elapsed = time_candidate(candidate)
        except Exception as exc:  # a tile this GPU cannot compile or fit (Triton's errors): not a candidate
            logger.warning("start-up timing skips %s: %s: %s", candidate, type(exc).__name__,
                           str(exc).splitlines()[0] if str(exc) else "")
            continue
        if elapsed < best_time:
            best, best_time = candidate, elapsed
    return best, best_time if best is not None else baseline_ms


def _fastest_config(timed, separate: float, run_config) -> tuple[tuple | None, float, float]:
    """(the GEMV config faster than `separate` ms, if any, separate ms, its ms)."""
    best, best_time = fastest(GEMV_CONFIGS, lambda config: timed(lambda w: run_config(w, config)), separate,
                              margin=1.0)
    return best, separate, best_time


@torch.inference_mode()
def fastest_single_row_kernel(weight: torch.Tensor) -> tuple[SingleRowKernel, float, float]:
    """(kernel, cuBLAS GEMM ms, its ms): None (cuBLAS GEMM) unless another is at least 5% faster."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    timed = cold_timer(weight)
    baseline = timed(lambda w: linear(x, w, None, None))
    candidates = ["mv"] + (list(GEMV_CONFIGS) if HAS_TRITON else [])
    best, best_time = fastest(candidates, lambda candidate: timed(lambda w: linear(x, w, None, candidate)), baseline)
    return best, baseline, best_time


@torch.inference_mode()
def fastest_gated_row_kernel(weight: torch.Tensor, activation: str,
                             single_row: SingleRowKernel) -> tuple[tuple | None, float, float]:
    """(config, separate ms, fused ms) for the down projection of a gated MLP at batch 1: the activation's
    own kernel followed by `single_row`'s product, against the GEMV configs that apply the activation to
    their input; a config only where it is faster."""
    if not HAS_TRITON:
        return None, 0.0, 0.0
    gate_up = torch.randn(1, 2 * weight.shape[1], dtype=weight.dtype, device=weight.device)
    act = _GATED_ACTIVATIONS[activation]
    timed = cold_timer(weight)
    separate = timed(lambda w: linear(act(gate_up), w, None, single_row))
    return _fastest_config(timed, separate, lambda w, config: linear_gated(gate_up, w, None, config, activation))


@torch.inference_mode()
def fastest_normed_row_kernel(weight: torch.Tensor, single_row: SingleRowKernel) -> tuple[tuple | None, float, float]:
    """(config, separate ms, fused ms) for a projection behind a residual add and RMSNorm at batch 1: the
    norm's own kernel followed by `single_row`'s product, against the GEMV configs that normalize their
    input row; a config only where it is faster."""
    if not HAS_TRITON:
        return None, 0.0, 0.0
    k = weight.shape[1]
    hidden, residual = (torch.randn(1, k, dtype=weight.dtype, device=weight.device) for _ in range(2))
    norm_weight = torch.ones(k, dtype=weight.dtype, device=weight.device)
    timed = cold_timer(weight)
    separate = timed(lambda w: linear(fused_add_rms_norm(hidden, residual, norm_weight, 1e-6)[0], w, None, single_row))
    return _fastest_config(timed, separate,
                           lambda w, config: linear_normed(hidden, residual, norm_weight, 1e-6, w, None, config))
