"""`LoRARequest`: which adapter a request runs with, as vLLM names it (`vllm.lora.request.LoRARequest`)."""
from __future__ import annotations

from dataclasses import dataclass

from asyncserve.errors import InvalidParameterError


@dataclass(frozen=True)
class LoRARequest:
    """`lora_int_id` (>= 1) identifies the adapter everywhere (its GPU slot, the prefix cache's key); two
    requests with the same id must name the same adapter."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise InvalidParameterError(f"lora_int_id must be an integer >= 1, got {self.lora_int_id!r}.",
                                        "lora_request")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
