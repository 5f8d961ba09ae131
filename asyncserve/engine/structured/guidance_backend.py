"""llguidance (Microsoft's guidance engine; vLLM's `guidance` backend): masks computed lazily per step."""
from __future__ import annotations

import json
import os
import sys

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from asyncserve.engine.structured.backend import GrammarBackend
from asyncserve.engine.structured.constraints import choice_regex, constraint_error, json_schema
from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import StructuredOutputsParams


class GuidanceMatcher:
    """llguidance's matcher under the names the engine calls."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: llguidance.LLMatcher):
        self.matcher = matcher

    def accept_token(self, token_id: int) -> bool:
        return self.matcher.consume_token(token_id)

    def is_terminated(self) -> bool:
        return self.matcher.is_stopped()

    def rollback(self, num_tokens: int) -> None:
        self.matcher.rollback(num_tokens)


class GuidanceBackend(GrammarBackend):
    name = "guidance"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids)
        self.vocab_size, self.stop_token_ids = vocab_size, stop_token_ids
        self.executor = llguidance.LLExecutor(min(8, os.cpu_count() or 1))

    def compile(self, params: StructuredOutputsParams):
        try:
            grammar = self._grammar(params)
        except InvalidParameterError:
            raise
        except Exception as exc:  # llguidance's converters raise plain Exception
            raise constraint_error(params, str(exc)) from None
        error = _validate(grammar, self.tokenizer)
        if error:
            raise constraint_error(params, error)
        return grammar

    @staticmethod
    def _grammar(params: StructuredOutputsParams) -> str:
        kind = params.kind
        whitespace = {"whitespace_flexible": not params.disable_any_whitespace}
        if kind == "json":
            schema = json.dumps(json_schema(params))
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=whitespace)
        elif kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', overrides=whitespace)
        elif kind == "regex":
            grammar = llguidance.grammar_from("regex", params.regex)
        elif kind == "choice":
            grammar = llguidance.grammar_from("regex", choice_regex(params.choice))
        elif kind == "grammar":
            grammar = llguidance.grammar_from("grammar", params.grammar)
        else:
            raise constraint_error(params, "structural tags need the xgrammar backend.")
        return grammar

    def grammar_bytes(self, grammar: str) -> int:
        return sys.getsizeof(grammar)

    def matches_nothing(self, grammar: str) -> bool:
        matcher = llguidance.LLMatcher(self.tokenizer, grammar)
        if matcher.is_accepting():
            return False
        bitmask = llguidance.torch.allocate_token_bitmask(1, self.vocab_size)
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        for token_id in self.stop_token_ids:  # llguidance offers a stop token even where it cannot end
            bitmask[0, token_id // 32] &= ~(1 << (token_id % 32))
        return not bool(bitmask.any())

    def new_matcher(self, grammar) -> GuidanceMatcher:
        return GuidanceMatcher(llguidance.LLMatcher(self.tokenizer, grammar))

    def accept_prefix(self, matcher: GuidanceMatcher, token_ids: list[int]) -> int:
        # A token llguidance rejects puts its matcher in an error state that no rollback clears: the
        # accepted prefix is found first, without moving (try_consume_tokens would not count a stop token).
        count = matcher.matcher.validate_tokens(token_ids)
        if count:
            matcher.matcher.consume_tokens(token_ids[:count])
        return count

    def fill_bitmask(self, matchers: list[GuidanceMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        llguidance.torch.fill_next_token_bitmask_par(
            self.executor, [(m.matcher, row) for m, row in zip(matchers, rows)], bitmask)


def _validate(grammar: str, tokenizer) -> str:
    """llguidance's error text, empty when the grammar is fine."""
    try:
        return llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
