"""The parallel part of the config tree: how many tensor-parallel ranks share the model."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1
