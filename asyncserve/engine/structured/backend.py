"""The one small interface a grammar engine sits behind: compile a constraint, make per-sequence
matchers, fill packed int32 token bitmasks for many matchers at once. xgrammar and llguidance plug in."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from asyncserve.sampling_params import StructuredOutputsParams


class GrammarMatcher(Protocol):
    """One sequence's position in its grammar."""

    def accept_token(self, token_id: int) -> bool: ...   # False: the grammar rejects the token

    def is_terminated(self) -> bool: ...                 # accepted a stop token at an end of the grammar

    def rollback(self, num_tokens: int) -> None: ...


class GrammarBackend(ABC):
    """Compiles constraints for one tokenizer and vocabulary (the model's logits width)."""

    name: str

    @abstractmethod
    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar; raises InvalidParameterError naming what is wrong with the constraint."""

    @abstractmethod
    def grammar_bytes(self, grammar) -> int:
        """What keeping `grammar` costs the process, as measured by scripts/bench_grammar_cache.py."""

    @abstractmethod
    def new_matcher(self, grammar) -> GrammarMatcher:
        """A matcher at the grammar's start."""

    @abstractmethod
    def matches_nothing(self, grammar) -> bool:
        """Whether no output can satisfy `grammar`: it allows no first token and cannot end at once (a
        rule that only refers to itself, contradictory constraints the engine sees at the start)."""

    @abstractmethod
    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        """Writes matcher i's allowed next tokens into row rows[i] of bitmask [R, ceil(V / 32)] int32 (CPU)."""

    def accept_prefix(self, matcher: GrammarMatcher, token_ids: list[int]) -> int:
        """Advances `matcher` through the longest prefix of `token_ids` its grammar accepts (nothing after a
        stop token it accepts); returns that prefix's length. The matcher is left as it was on the first
        token it rejects (xgrammar's `accept_token` does not move on a rejected token)."""
        count = 0
        for token_id in token_ids:
            if matcher.is_terminated() or not matcher.accept_token(token_id):
                break
            count += 1
        return count
