"""The executor: where the model lives and steps run, behind one small interface.

The engine builds one step message per step and hands it over; it never touches the model, the KV
tensors or the runner. `UniprocExecutor` runs the model in this process; `MultiprocExecutor` (tensor
parallelism) implements the same methods, broadcasting each message to its worker processes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from asyncserve.runner.pending import PendingStep
from asyncserve.runner.step import StepMessage, StepOutput


class Executor(ABC):
    """Loads the model, sizes and owns the KV pool, runs steps."""

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """How many KV blocks fit (the minimum over workers, when there are several)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int, num_host_blocks: int, num_host_state_slots: int = 0) -> None:
        """Allocates the pool (and host swap space; hybrid models: the state pool and its host slots),
        then captures graphs."""

    @abstractmethod
    def bytes_per_block(self) -> int:
        """Device bytes of one KV block, all layers."""

    def state_slot_bytes(self) -> int:
        """Device bytes of one sequence's recurrent state, all layers (0: the model keeps none; hybrid
        models are served by one process only, so only UniprocExecutor knows other values)."""
        return 0

    def lora_shapes(self) -> dict[str, tuple[int, list[int]]]:
        """The layers LoRA adapters may adapt, by checkpoint name: their whole (input size, output slices),
        what an adapter saved by PEFT must fit (empty without LoRA)."""
        return {}

    @abstractmethod
    def launch(self, message: StepMessage) -> PendingStep:
        """Queues one step and returns before its results are on the host; may run on a worker thread.
        Steps are launched in order, and each one's `result()` is read before the one after next."""

    @abstractmethod
    def sample(self, pending: PendingStep, bitmask: torch.Tensor, rows: list[int]) -> None:
        """Samples a launched step that waits for grammar masks (`pending.needs_grammar_masks`): bitmask
        row i (int32, host) masks sample row rows[i] (a verify step's rows: a sequence with d drafts,
        `pending.num_drafts`, has d + 1). Must come before the next launch."""

    def execute(self, message: StepMessage) -> StepOutput:
        """Runs one step to the end."""
        return self.launch(message).result()

    def shutdown(self) -> None:
        """Releases workers (nothing to do in one process)."""
