"""Tensor-parallel linears (Megatron's split): a column-parallel layer holds this rank's rows of the
output (QKV by heads, gate|up by intermediate slice) and needs no communication; a row-parallel layer
holds this rank's columns of the input and sums the ranks' partial products (all-reduce). Each weight
loader narrows the whole checkpoint tensor to this rank's shard, so a rank holds only its part.
Used only when tensor_parallel_size > 1; one process keeps the plain layers of linear.py."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.layers.linear import Linear, MergedLinear, default_weight_loader
from asyncserve.layers.parallel_state import all_reduce, tp_rank, tp_size
from asyncserve.tp_shapes import divide, kv_heads_per_rank


class ColumnParallelMergedLinear(MergedLinear):
    """Several projections in one matmul, each cut to this rank's rows: `shards` maps a shard id to
    (its whole size, the row where this rank's part starts, this rank's size)."""

    def __init__(self, in_features: int, shards: dict[str, tuple[int, int, int]], bias: bool = False,
                 prefix: str = ""):
        self.shard_starts = {name: start for name, (_, start, _) in shards.items()}
        super().__init__(in_features, {name: size for name, (_, _, size) in shards.items()}, bias,
                         None, prefix)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str) -> None:
        _, size = self.shard_offsets[shard_id]
        start = self.shard_starts[shard_id]
        if loaded_weight.shape[0] < start + size:
            raise ValueError(f"checkpoint shard {shard_id!r} has {loaded_weight.shape[0]} rows, rank "
                             f"{tp_rank()} needs rows {start}..{start + size}")
        super().weight_loader(param, loaded_weight.narrow(0, start, size), shard_id)


def qkv_parallel(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 prefix: str) -> tuple[ColumnParallelMergedLinear, int, int]:
    """QKV cut by heads: (layer, this rank's query heads, this rank's KV heads)."""
    rank, size = tp_rank(), tp_size()
    heads = divide(num_heads, size, "num_attention_heads")
    kv_heads = kv_heads_per_rank(num_kv_heads, size)
    kv_start = (rank * num_kv_heads // size if num_kv_heads < size else rank * kv_heads) * head_dim
    shards = {"q_proj": (num_heads * head_dim, rank * heads * head_dim, heads * head_dim),
              "k_proj": (num_kv_heads * head_dim, kv_start, kv_heads * head_dim),
              "v_proj": (num_kv_heads * head_dim, kv_start, kv_heads * head_dim)}
    return ColumnParallelMergedLinear(hidden_size, shards, bias, prefix), heads, kv_heads


def gate_up_parallel(hidden_size: int, intermediate_size: int, bias: bool,
                     prefix: str) -> ColumnParallelMergedLinear:
    size = divide(intermediate_size, tp_size(), "intermediate_size")
    start = tp_rank() * size
    return ColumnParallelMergedLinear(
        hidden_size, {"gate_proj": (intermediate_size, start, size), "up_proj": (intermediate_size, start, size)},
        bias, prefix)


class RowParallelLinear(Linear):
    """x [T, in / size] (this rank's slice) -> [T, out], summed over ranks; the bias is added once,
    after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, prefix: str = ""):
        self.in_per_rank = divide(in_features, tp_size(), f"{prefix} input size")
        super().__init__(self.in_per_rank, out_features, bias, None, prefix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(self.quant_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor) -> None:
        if param is self.weight:
            loaded_weight = loaded_weight.narrow(1, tp_rank() * self.in_per_rank, self.in_per_rank)
        default_weight_loader(param, loaded_weight)
