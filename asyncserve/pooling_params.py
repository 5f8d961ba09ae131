"""Pooling parameters (vLLM's `PoolingParams`): what one embedding request asks of a pooling model."""
from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import ClassVar

from asyncserve.errors import InvalidParameterError
from asyncserve.utils.truncation import truncate_left


@dataclass
class PoolingParams:
    """`dimensions` truncates a Matryoshka model's embedding; `normalize` None takes the model's pooler
    setting; `truncate_prompt_tokens` keeps the prompt's last k tokens (-1: max_model_len), as vLLM."""

    dimensions: int | None = None
    normalize: bool | None = None
    truncate_prompt_tokens: int | None = None

    # What the engine core reads of every request's parameters: a pooling request computes its prompt
    # once, samples nothing and forks nothing (the scheduler and runner need no branch for it).
    n: ClassVar[int] = 1
    best_of: ClassVar[int] = 1
    seed: ClassVar[None] = None
    max_tokens: ClassVar[int] = 0
    logprobs: ClassVar[None] = None
    prompt_logprobs: ClassVar[None] = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and (type(self.dimensions) is not int or self.dimensions < 1):
            raise InvalidParameterError(f"dimensions must be a positive integer, got {self.dimensions!r}.",
                                        "dimensions")
        keep = self.truncate_prompt_tokens
        if keep is not None and (type(keep) is not int or (keep < 1 and keep != -1)):
            raise InvalidParameterError(f"truncate_prompt_tokens must be -1 or >= 1, got {keep!r}.",
                                        "truncate_prompt_tokens")

    def truncate_prompt(self, token_ids: list[int], max_model_len: int) -> list[int]:
        return truncate_left(token_ids, self.truncate_prompt_tokens, max_model_len, InvalidParameterError)

    def clone(self) -> "PoolingParams":
        return copy(self)
