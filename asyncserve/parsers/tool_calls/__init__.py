"""Tool calls in a model's own text (`--tool-call-parser`), whole or as it streams."""
from asyncserve.parsers.tool_calls.base import (
    ArgumentsDelta,
    ContentDelta,
    ExtractedToolCalls,
    ToolCall,
    ToolCallStart,
    ToolParser,
    collect,
)
from asyncserve.parsers.tool_calls.registry import get_tool_parser, register, tool_parser_names

__all__ = ["ArgumentsDelta", "ContentDelta", "ExtractedToolCalls", "ToolCall", "ToolCallStart", "ToolParser",
           "collect", "get_tool_parser", "register", "tool_parser_names"]
