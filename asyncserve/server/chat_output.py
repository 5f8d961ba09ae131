"""One chat choice's text through the reasoning parser, then the tool-call parser (on the content only):
OpenAI's streamed deltas, and the whole message built from the very same deltas, so both always agree.

Reasoning goes out as `reasoning_content` and, under vLLM's newer name, `reasoning` (the same text).
"""
from __future__ import annotations

from typing import Callable

from asyncserve.parsers.reasoning import ReasoningParser, get_reasoning_parser
from asyncserve.parsers.tool_calls import ContentDelta, ToolCallStart, ToolParser, get_tool_parser
from asyncserve.parsers.tool_calls.forced import NamedFunctionParser, RequiredCallsParser
from asyncserve.server.tools import ToolChoice
from asyncserve.utils.ids import random_hex_id


def tool_call_id() -> str:
    return f"chatcmpl-tool-{random_hex_id()}"


class ChoiceParser:
    """Turns one choice's text deltas into OpenAI delta objects (content, reasoning, tool_calls)."""

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None, max_calls: int | None):
        self.reasoning = reasoning
        self.tools = tools
        self.max_calls = max_calls
        self.num_calls = 0

    def feed(self, text: str) -> list[dict]:
        if self.reasoning is None:
            return self._content(text, final=False)
        reasoning, content = self.reasoning.feed(text)
        return _reasoning(reasoning) + self._content(content, final=False)

    def finish(self) -> list[dict]:
        if self.reasoning is None:
            return self._content("", final=True)
        reasoning, content = self.reasoning.finish()
        return _reasoning(reasoning) + self._content(content, final=True)

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.num_calls and reason == "stop" else reason

    def _content(self, text: str, final: bool) -> list[dict]:
        if self.tools is None:
            return [{"content": text}] if text else []
        deltas = self.tools.feed(text) if text else []
        if final:
            deltas += self.tools.finish()
        out = []
        for delta in deltas:
            if isinstance(delta, ContentDelta):
                out.append({"content": delta.text})
                continue
            if self.max_calls is not None and delta.index >= self.max_calls:
                continue  # parallel_tool_calls: false keeps the first call only
            if isinstance(delta, ToolCallStart):
                self.num_calls += 1
                out.append({"tool_calls": [{"index": delta.index, "id": tool_call_id(), "type": "function",
                                            "function": {"name": delta.name, "arguments": ""}}]})
            else:
                out.append({"tool_calls": [{"index": delta.index, "function": {"arguments": delta.text}}]})
        return out


def _reasoning(text: str) -> list[dict]:
    return [{"reasoning_content": text, "reasoning": text}] if text else []


def message(parser: ChoiceParser, text: str) -> dict:
    """The whole assistant message of `text`, reassembled from its deltas as a client would."""
    content, reasoning, calls = [], [], []
    for delta in parser.feed(text) + parser.finish():
        if "content" in delta:
            content.append(delta["content"])
        elif "reasoning" in delta:
            reasoning.append(delta["reasoning"])
        else:
            call = delta["tool_calls"][0]
            if "id" in call:
                calls.append({"id": call["id"], "type": "function",
                              "function": {"name": call["function"]["name"], "arguments": ""}})
            else:
                calls[call["index"]]["function"]["arguments"] += call["function"]["arguments"]
    body = "".join(content)
    # As vLLM: no content is null next to tool calls (whitespace included) or after reasoning.
    empty = not body.strip() if calls else not body and bool(reasoning)
    result = {"role": "assistant", "content": None if empty else body}
    if parser.reasoning is not None:
        joined = "".join(reasoning) or None
        result["reasoning_content"] = result["reasoning"] = joined
    if calls:
        result["tool_calls"] = calls
    return result


def parser_factory(tool_choice: ToolChoice | None, tool_parser: str | None, reasoning_parser: str | None,
                   chat_template_kwargs: dict) -> Callable[[], ChoiceParser] | None:
    """How to make each choice's parser for this request; None when its text needs no parsing."""
    mode = tool_choice.mode if tool_choice is not None else "none"
    if mode == "none" and reasoning_parser is None:
        return None
    max_calls = None if tool_choice is None or tool_choice.parallel else 1

    def make() -> ChoiceParser:
        # A forced call is JSON from the first token: the grammar leaves no room for thinking.
        reasoning = None if tool_choice is not None and tool_choice.forced or reasoning_parser is None \
            else get_reasoning_parser(reasoning_parser)(chat_template_kwargs)
        if mode == "auto":
            tools = get_tool_parser(tool_parser)()
        elif mode == "required":
            tools = RequiredCallsParser()
        elif mode == "function":
            tools = NamedFunctionParser(tool_choice.function)
        else:
            tools = None
        return ChoiceParser(reasoning, tools, max_calls)

    return make
