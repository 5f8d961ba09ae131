"""Chooses, per weight shape, between cuBLAS GEMM and matrix-vector kernels for one-row products.

Batch-1 decode reads every weight once per token: a kernel at half the memory bandwidth on a few
projections costs more than all the attention of a short context. Timing both at start-up takes
milliseconds and keeps whichever is faster on this GPU, this library version, this shape.
"""
from __future__ import annotations

import logging

import torch
from torch.nn import functional as F

from asyncserve.layers.linear import Linear

logger = logging.getLogger("asyncserve")


def _time(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


@torch.inference_mode()
def matvec_is_faster(weight: torch.Tensor) -> bool:
    x = torch.randn(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    gemm = _time(lambda: F.linear(x, weight))
    matvec = _time(lambda: torch.mv(weight, x[0]))
    return matvec < 0.95 * gemm


def tune_single_row_products(model: torch.nn.Module) -> None:
    choice: dict[tuple, bool] = {}
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            key = (tuple(module.weight.shape), module.weight.dtype)
            if key not in choice:
                choice[key] = matvec_is_faster(module.weight)
                if choice[key]:
                    chosen.append(f"{key[0][0]}x{key[0][1]}")
            module.use_matvec = choice[key]
    if hasattr(model, "logits_use_matvec"):
        weight = model.embed_tokens.weight if model.tie_word_embeddings else model.lm_head.weight
        model.logits_use_matvec = matvec_is_faster(weight)
        if model.logits_use_matvec:
            chosen.append("logits")
    logger.info("single-row products through the matrix-vector kernel: %s", ", ".join(chosen) or "none")
