"""The model and its runner in this process: the executor of tensor_parallel_size 1, and each rank's
part inside a tensor-parallel worker."""
from __future__ import annotations

import torch

from asyncserve.config.tree import Config
from asyncserve.executor.base import Executor
from asyncserve.models.base import CausalLM
from asyncserve.runner.pending import PendingStep
from asyncserve.runner.step import StepMessage


class UniprocExecutor(Executor):
    """The model and its runner in this process; `execute` runs on the caller's thread."""

    def __init__(self, config: Config):
        from asyncserve.models.loader import load_model
        self.config = config
        model_config = config.model
        torch.manual_seed(model_config.seed)
        model = load_model(config)
        # Speculative decoding's draft model (or EAGLE-3 head, which shares the target's embedding when its
        # checkpoint has none), beside the target: same dtype and device, its own checkpoint.
        draft = None
        if config.draft_model is not None and config.speculative.method == "eagle3":
            from asyncserve.models.eagle3 import load_eagle3_head
            draft = load_eagle3_head(config.draft_tree(), model)
        elif config.draft_model is not None:
            draft = load_model(config.draft_tree())
        self.runner = _make_runner(model, config, draft)

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    def determine_num_blocks(self) -> int:
        from asyncserve.runner.memory import num_kv_blocks
        return num_kv_blocks(self.runner, self.config)

    def bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def state_slot_bytes(self) -> int:
        from asyncserve.runner.state_pool import state_bytes_per_slot
        return state_bytes_per_slot(self.runner.model.state_layers())

    def lora_shapes(self) -> dict[str, tuple[int, list[int]]]:
        slots = self.runner.lora_slots
        return slots.shapes() if slots is not None else {}

    def initialize_cache(self, num_blocks: int, num_host_blocks: int, num_host_state_slots: int = 0) -> None:
        self.runner.allocate_kv_pool(num_blocks)
        if num_host_blocks:
            self.runner.kv_pool.allocate_swap_space(num_host_blocks)
            if self.runner.drafter is not None:
                self.runner.drafter.allocate_swap_space(num_host_blocks)
        if num_host_state_slots:
            self.runner.state_pool.allocate_swap_space(num_host_state_slots)
        self.runner.prepare()

    def launch(self, message: StepMessage) -> PendingStep:
        return self.runner.launch(message)

    def sample(self, pending: PendingStep, bitmask: torch.Tensor, rows: list[int]) -> None:
        self.runner.sample(pending, bitmask, rows)


def _make_runner(model: CausalLM, config: Config, draft_model: CausalLM | None = None):
    if config.model.device.type == "cuda":
        from asyncserve.runner.cuda_runner import CudaModelRunner
        return CudaModelRunner(model, config, draft_model)
    from asyncserve.runner.model_runner import ModelRunner
    return ModelRunner(model, config, draft_model)
