"""Chooses, per weight shape, the fastest kernel for one-row products (batch-1 decode).

Batch-1 decode reads every weight once per token, so a kernel at half the memory bandwidth on a few
projections costs more than all the attention of a short context. Timing the candidates at start-up
takes well under a second and keeps whichever is fastest on this GPU, library version and shape.
"""
from __future__ import annotations

import logging

import torch

from asyncserve.kernels import GEMV_CONFIGS, HAS_TRITON
from asyncserve.layers.linear import Linear, linear

logger = logging.getLogger("asyncserve")


def _time(fn, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


# In the model each weight is read once per step, never from L2: time over enough copies of it
# that the L2 (50 MB on an H100) cannot hold them, or small weights look faster than they run.
_COLD_BYTES = 256 << 20


@torch.inference_mode()
def fastest_single_row_kernel(weight: torch.Tensor):
    """None (cuBLAS GEMM) unless another candidate is at least 5% faster."""
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    num_copies = max(1, min(16, _COLD_BYTES // (weight.numel() * weight.element_size())))
    copies = [weight] + [weight.clone() for _ in range(num_copies - 1)]

    def timed(kernel) -> float:
        def run():
            for copy in copies:
                linear(x, copy, None, kernel)
        return _time(run, repeats=5) / len(copies)

    baseline = timed(None)
    candidates = ["mv"] + (list(GEMV_CONFIGS) if HAS_TRITON else [])
    best, best_time = None, 0.95 * baseline
    for candidate in candidates:
        elapsed = timed(candidate)
        if elapsed < best_time:
            best, best_time = candidate, elapsed
    return best, baseline, best_time


def tune_single_row_products(model: torch.nn.Module) -> None:
    choices: dict[tuple, object] = {}
    report = []
    for module in model.modules():
        if isinstance(module, Linear):
            key = (tuple(module.weight.shape), module.weight.dtype)
            if key not in choices:
                choices[key], baseline, best = fastest_single_row_kernel(module.weight)
                if choices[key] is not None:
                    report.append(f"{key[0][0]}x{key[0][1]}: {choices[key]} {best * 1e3:.1f} us "
                                  f"(cuBLAS {baseline * 1e3:.1f} us)")
            module.single_row = choices[key]
    weight = model.embed_tokens.weight if model.tie_word_embeddings else model.lm_head.weight
    model.logits_single_row, baseline, best = fastest_single_row_kernel(weight)
    if model.logits_single_row is not None:
        report.append(f"logits: {model.logits_single_row} {best * 1e3:.1f} us (cuBLAS {baseline * 1e3:.1f} us)")
    logger.info("one-row products: %s", "; ".join(report) or "cuBLAS GEMM for every shape")
