"""Linear layers: one-row products may take another kernel than cuBLAS's GEMM, and fused projections
(QKV, gate|up) stack several checkpoint tensors in one weight."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from asyncserve.kernels import gemv_triton

# How a one-row product runs: None = cuBLAS GEMM, "mv" = cuBLAS matrix-vector, or a Triton GEMV
# config (see asyncserve.kernels.GEMV_CONFIGS). Chosen per weight shape by timing at start-up.
SingleRowKernel = None | str | tuple


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           single_row: SingleRowKernel = None) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T (+ bias). For M == 1 cuBLAS's GEMM picks split-K kernels that read
    some weight shapes at half the memory bandwidth, so batch-1 decode may use another kernel."""
    if single_row is None or x.shape[0] != 1:
        return F.linear(x, weight, bias)
    if single_row == "mv":
        out = torch.mv(weight, x[0])
        return (out if bias is None else out + bias)[None]
    return gemv_triton(x, weight, bias, single_row)


class Linear(nn.Linear):
    """nn.Linear with the one-row choice above."""

    single_row: SingleRowKernel = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.single_row)


class MergedLinear(Linear):
    """One matmul for several projections; `load_shard` fills one of them from the checkpoint."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self.shard_offsets[name] = (start, size)
            start += size

    @torch.no_grad()
    def load_shard(self, shard: str, param_name: str, tensor: torch.Tensor) -> None:
        start, size = self.shard_offsets[shard]
        target = getattr(self, param_name)
        if tensor.shape[0] != size:
            raise ValueError(f"checkpoint shard {shard}.{param_name} has {tensor.shape[0]} rows, "
                             f"expected {size}")
        target[start:start + size].copy_(tensor)
