"""xgrammar (what vLLM and SGLang use by default): compiled grammars with precomputed token masks."""
from __future__ import annotations

import json
import os

import torch
import xgrammar as xgr

from asyncserve.engine.structured.backend import GrammarBackend, GrammarMatcher
from asyncserve.engine.structured.constraints import choice_regex, constraint_error, json_schema
from asyncserve.engine.structured.xgrammar_schema import (SchemaError, strict_string_classes, xgrammar_schema,
                                                          xgrammar_structural_tag)
from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import StructuredOutputsParams


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        threads = min(8, os.cpu_count() or 1)
        self.vocab_size = vocab_size
        # xgrammar's own cache has no bound by default and keeps what ours evicts: ours is the one cache.
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)

    def compile(self, params: StructuredOutputsParams):
        compiler, whitespace = self.compiler, not params.disable_any_whitespace
        try:
            kind = params.kind
            if kind in ("json", "json_object"):
                return compiler.compile_grammar(_json_grammar(params, whitespace))
            if kind == "regex":
                return compiler.compile_regex(params.regex)
            if kind == "choice":
                return compiler.compile_regex(choice_regex(params.choice))
            if kind == "grammar":
                return compiler.compile_grammar(params.grammar)
            return compiler.compile_structural_tag(xgrammar_structural_tag(params.structural_tag))
        except InvalidParameterError:
            raise
        except (SchemaError, RuntimeError, ValueError, TypeError) as exc:
            raise constraint_error(params, str(exc)) from None

    def grammar_bytes(self, grammar) -> int:
        # The process grows by 1.0-1.3x what xgrammar counts (scripts/bench_grammar_cache.py): the upper end.
        return grammar.memory_size_bytes * 13 // 10

    def matches_nothing(self, grammar) -> bool:
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        bitmask.zero_()
        xgr.GrammarMatcher(grammar).fill_next_token_bitmask(bitmask, 0)  # stop tokens set where it can end
        return not bool(bitmask.any())

    def new_matcher(self, grammar) -> GrammarMatcher:
        return xgr.GrammarMatcher(grammar)

    def fill_bitmask(self, matchers: list[GrammarMatcher], bitmask: torch.Tensor, rows: list[int]) -> None:
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, rows[0])
        else:
            self.batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)


def _json_grammar(params: StructuredOutputsParams, any_whitespace: bool) -> str:
    """The EBNF xgrammar makes of the schema (patterns made safe first), with strict string characters
    (see xgrammar_schema.py)."""
    if params.kind == "json_object":
        grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=any_whitespace,
                                               strict_mode=False)
    else:
        schema = json.dumps(xgrammar_schema(json_schema(params)))
        grammar = xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace)
    return strict_string_classes(str(grammar))
