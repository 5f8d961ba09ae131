"""The executor: where the model lives and steps run, behind one small interface.

The engine builds one step message per step and hands it over; it never touches the model, the KV
tensors or the runner. Today the model runs in this process (`UniprocExecutor`); a multi-process
executor for tensor parallelism implements the same methods, broadcasting each message to its workers.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch

from asyncserve.runner.pending import PendingStep
from asyncserve.runner.step import StepMessage, StepOutput

logger = logging.getLogger("asyncserve")


class Executor(ABC):
    """Loads the model, sizes and owns the KV pool, runs steps."""

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """How many KV blocks fit (the minimum over workers, when there are several)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int, num_host_blocks: int) -> None:
        """Allocates the pool (and host swap space), then captures graphs."""

    @abstractmethod
    def bytes_per_block(self) -> int:
        """Device bytes of one KV block, all layers."""

    @abstractmethod
    def launch(self, message: StepMessage) -> PendingStep:
        """Queues one step and returns before its results are on the host; may run on a worker thread.
        Steps are launched in order, and each one's `result()` is read before the one after next."""

    @abstractmethod
    def sample(self, pending: PendingStep, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Samples a launched step that waits for grammar masks (`pending.needs_grammar_masks`): bitmask
        row i (int32, host) masks sample row rows[i]. Must come before the next launch."""

    def execute(self, message: StepMessage) -> StepOutput:
        """Runs one step to the end."""
        return self.launch(message).result()

    def shutdown(self) -> None:
        """Releases workers (nothing to do in one process)."""


class UniprocExecutor(Executor):
    """The model and its runner in this process; `execute` runs on the caller's thread."""

    def __init__(self, config):
        from asyncserve.models.loader import load_model
        self.config = config
        model_config = config.model
        torch.manual_seed(model_config.seed)
        model = load_model(config)
        self.runner = _make_runner(model, config)

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    def determine_num_blocks(self) -> int:
        from asyncserve.runner.memory import num_kv_blocks
        return num_kv_blocks(self.runner, self.config)

    def bytes_per_block(self) -> int:
        from asyncserve.runner.kv_pool import bytes_per_block
        attention = self.runner.model.attention_layers()
        return bytes_per_block(len(attention), self.config.cache.block_size, attention[0].num_kv_heads,
                               attention[0].head_dim, self.config.kv_cache_torch_dtype)

    def initialize_cache(self, num_blocks: int, num_host_blocks: int) -> None:
        self.runner.allocate_kv_pool(num_blocks)
        if num_host_blocks:
            self.runner.kv_pool.allocate_swap_space(num_host_blocks)
        self.runner.prepare()

    def launch(self, message: StepMessage) -> PendingStep:
        return self.runner.launch(message)

    def sample(self, pending: PendingStep, bitmask: torch.Tensor, rows: list[int]) -> None:
        self.runner.sample(pending, bitmask, rows)


def make_executor(config) -> Executor:
    """One process for tensor_parallel_size 1 (no torch.distributed at all); worker processes above."""
    if config.parallel.tensor_parallel_size == 1:
        return UniprocExecutor(config)
    from asyncserve.runner.multiproc_executor import MultiprocExecutor
    return MultiprocExecutor(config)


def _make_runner(model, config):
    if config.model.device.type == "cuda":
        from asyncserve.runner.cuda_runner import CudaModelRunner
        return CudaModelRunner(model, config)
    from asyncserve.runner.model_runner import ModelRunner
    return ModelRunner(model, config)
