"""What `LLM.generate` returns and what `AsyncEngine.generate` streams (vLLM's shapes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position: token id -> Logprob for the chosen token and the top-N.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort"
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class EmbeddingOutput:
    """One prompt's embedding; `data` is the [D] float32 CPU tensor, `embedding` the list vLLM gives."""

    data: Any

    @property
    def embedding(self) -> list[float]:
        return self.data.tolist()

    @property
    def hidden_size(self) -> int:
        return len(self.data)


@dataclass
class EmbeddingRequestOutput:
    """What `LLM.embed` returns and `AsyncEngine.embed` resolves to (vLLM's shape)."""

    request_id: str
    outputs: EmbeddingOutput | None  # None only when the request was aborted before its prompt ran
    prompt_token_ids: list[int]
    finished: bool = True
    prompt: str | None = None
