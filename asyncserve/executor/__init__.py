"""Executors: the engine's one door to where the model runs (this process, or tensor-parallel workers)."""
from __future__ import annotations

from asyncserve.config.tree import Config
from asyncserve.executor.base import Executor


def make_executor(config: Config) -> Executor:
    """One process for tensor_parallel_size 1 (no torch.distributed at all); worker processes above."""
    if config.parallel.tensor_parallel_size == 1:
        from asyncserve.executor.uniproc import UniprocExecutor
        return UniprocExecutor(config)
    from asyncserve.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor(config)


__all__ = ["Executor", "make_executor"]
