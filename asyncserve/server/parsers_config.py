"""The server's parser flags checked at start-up, with vLLM's rules: a bad name fails before serving."""
from __future__ import annotations

from asyncserve.errors import ConfigError
from asyncserve.parsers.reasoning import reasoning_parser_names
from asyncserve.parsers.tool_calls import tool_parser_names


def check_parsers(tool_call_parser: str | None, enable_auto_tool_choice: bool,
                  reasoning_parser: str | None) -> None:
    if tool_call_parser is not None and tool_call_parser not in tool_parser_names():
        raise ConfigError(f"--tool-call-parser {tool_call_parser!r} is not known; choose one of "
                          f"{', '.join(tool_parser_names())}.")
    if enable_auto_tool_choice and tool_call_parser is None:
        raise ConfigError("--enable-auto-tool-choice needs --tool-call-parser: name the format the model writes "
                          f"tool calls in ({', '.join(tool_parser_names())}).")
    if reasoning_parser is not None and reasoning_parser not in reasoning_parser_names():
        raise ConfigError(f"--reasoning-parser {reasoning_parser!r} is not known; choose one of "
                          f"{', '.join(reasoning_parser_names())}.")
