"""Reasoning parsers (`--reasoning-parser`): a thinking model's `<think>` text apart from its answer."""
from asyncserve.parsers.reasoning.think import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    get_reasoning_parser,
    reasoning_parser_names,
)

__all__ = ["DeepSeekR1ReasoningParser", "Qwen3ReasoningParser", "ReasoningParser", "get_reasoning_parser",
           "reasoning_parser_names"]
