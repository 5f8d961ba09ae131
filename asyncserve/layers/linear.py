"""Linear layers: a single-row product may take the matrix-vector kernel, and fused projections
(QKV, gate|up) stack several checkpoint tensors in one weight."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, use_matvec: bool) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T. For M == 1 cuBLAS's GEMM picks split-K kernels that read some
    weight shapes at half the memory bandwidth; its matrix-vector kernel may do better."""
    if use_matvec and x.shape[0] == 1:
        out = torch.mv(weight, x[0])
        return (out if bias is None else out + bias)[None]
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear with the single-row choice above; `use_matvec` is set by timing at start-up."""

    use_matvec = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.use_matvec)


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
