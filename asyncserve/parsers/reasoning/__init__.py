"""Reasoning parsers (`--reasoning-parser`): a thinking model's `<think>` text (or GPT-OSS's analysis
channel) apart from its answer."""
from asyncserve.parsers.reasoning.harmony import GptOssReasoningParser
from asyncserve.parsers.reasoning.think import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
    ReasoningParser,
    get_reasoning_parser,
    reasoning_parser_names,
)

__all__ = ["DeepSeekR1ReasoningParser", "GptOssReasoningParser", "Qwen3ReasoningParser", "ReasoningParser", "get_reasoning_parser",
           "reasoning_parser_names"]
