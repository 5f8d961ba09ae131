"""This process's place in the tensor-parallel group and the collectives layers use: set once by a
tensor-parallel worker before it builds the model (executor/worker.py); in one process
(tensor_parallel_size 1) rank 0 of 1, every split is the whole and no layer calls torch.distributed."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorParallelState:
    rank: int = 0
    size: int = 1


_state = TensorParallelState()


def set_tensor_parallel(rank: int, size: int) -> None:
    global _state
    _state = TensorParallelState(rank, size)


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sums `x` over the ranks (partial products of row-parallel layers), in place; `x` itself at size 1."""
    if _state.size > 1:
        torch.distributed.all_reduce(x)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over the ranks, in place (a row-parallel weight's per-row range)."""
    if _state.size > 1:
        torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """[..., n] on every rank -> [..., size * n], rank order (vocabulary-parallel logits)."""
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
