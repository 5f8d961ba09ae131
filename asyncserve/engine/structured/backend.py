"""The one small interface a grammar engine sits behind: compile a constraint, make per-sequence
matchers, fill packed int32 token bitmasks for many matchers at once. xgrammar and llguidance plug in."""
from __future__ import annotations

import copy
import json
import re
from abc import ABC, abstractmethod
from typing import Protocol

import torch

from asyncserve.config.engine_args import STRUCTURED_OUTPUTS_BACKENDS
from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import MAX_JSON_DEPTH, StructuredOutputsParams, json_too_deep


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


BACKENDS = STRUCTURED_OUTPUTS_BACKENDS


def make_backend(name: str, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    if name == "xgrammar":
        from asyncserve.engine.structured.xgrammar_backend import XGrammarBackend
        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
    if name == "guidance":
        from asyncserve.engine.structured.guidance_backend import GuidanceBackend
        return GuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    raise InvalidParameterError(f"Unknown structured-outputs backend {name!r}; choose one of {list(BACKENDS)}.",
                                "structured_outputs_backend")


def json_schema(params: StructuredOutputsParams) -> dict:
    """The schema as a dict (the caller's: not to be changed), objects closed in a copy when
    disable_additional_properties asks for it."""
    schema = params.json
    if isinstance(schema, str):
        too_deep = constraint_error(params, f"the JSON schema nests deeper than {MAX_JSON_DEPTH} levels.")
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise constraint_error(params, f"the JSON schema is not valid JSON: {exc}") from None
        except RecursionError:
            raise too_deep from None
        if isinstance(schema, (dict, list)) and json_too_deep(schema):
            raise too_deep
    if not isinstance(schema, dict):
        raise constraint_error(params, "the JSON schema must be a JSON object.")
    return _closed_objects(copy.deepcopy(schema)) if params.disable_additional_properties else schema


def _closed_objects(node):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed_objects(value)
    elif isinstance(node, list):
        for value in node:
            _closed_objects(value)
    return node


def choice_regex(choices: list[str]) -> str:
    return "(" + "|".join(re.escape(choice) for choice in choices) + ")"


_NAMES = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
          "json_object": "JSON object", "structural_tag": "structural tag"}
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def constraint_error(params: StructuredOutputsParams, detail: str) -> InvalidParameterError:
    """A 400-shaped error: which constraint, and the grammar engine's words for what is wrong."""
    detail = _NATIVE_PREFIX.sub("", str(detail).strip()).strip()
    return InvalidParameterError(f"Invalid {_NAMES[params.kind]} for structured outputs: {detail}",
                                 f"structured_outputs.{params.kind}")
