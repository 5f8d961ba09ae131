"""LoRA adapters' part of the config tree, with vLLM's names: adapters in one batch (GPU slots), the largest
rank a slot holds, adapters kept loaded in host memory."""
from __future__ import annotations

from dataclasses import dataclass

from asyncserve.errors import ConfigError

MAX_LORA_RANK_LIMIT = 512  # vLLM's largest --max-lora-rank; any rank up to it is taken here


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras, as vLLM

    @property
    def num_cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras


def check_lora_config(max_loras: int, max_lora_rank: int, max_cpu_loras: int | None) -> LoRAConfig:
    if max_loras < 1:
        raise ConfigError(f"max_loras must be >= 1, got {max_loras}.")
    if not 1 <= max_lora_rank <= MAX_LORA_RANK_LIMIT:
        raise ConfigError(f"max_lora_rank must be in [1, {MAX_LORA_RANK_LIMIT}], got {max_lora_rank}.")
    if max_cpu_loras is not None and max_cpu_loras < max_loras:
        raise ConfigError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras ({max_loras}).")
    return LoRAConfig(max_loras, max_lora_rank, max_cpu_loras)
