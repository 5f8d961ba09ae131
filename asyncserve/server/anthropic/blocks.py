"""One reply's text as Anthropic content blocks: the chat path's parsers (reasoning, tool calls) cut it into
OpenAI deltas, which become `content_block_start/delta/stop` events; a whole reply's `content` is rebuilt
from the very same events, so a streamed and a non-streamed reply always agree."""
from __future__ import annotations

import json
from collections.abc import Callable

from asyncserve.server.chat_output import ChoiceParser
from asyncserve.utils.ids import random_hex_id

# Anthropic signs thinking blocks so that they can be sent back untouched; this server keeps no secret and
# drops thinking from earlier turns, so every block carries the same mark.
THINKING_SIGNATURE = "asyncserve-unsigned"

_START_BLOCKS = {"text": {"type": "text", "text": ""},
                 "thinking": {"type": "thinking", "thinking": "", "signature": ""}}


def tool_use_id() -> str:
    return f"toolu_{random_hex_id()}"


class ReplyBlocks:
    """Text in (as it streams, or whole), content-block events out; `num_tool_calls` for the stop reason.

    Whitespace before any block opens (a tool call's surroundings, the gap after a think block) is held
    until text follows it, so that no block of bare whitespace goes out beside a tool call."""

    def __init__(self, make_parser: Callable[[], ChoiceParser] | None):
        self.parser = make_parser() if make_parser is not None else None
        self.index = -1       # the open block's index in the reply's content
        self.kind = None      # the open block's type: "text", "thinking", "tool_use" or None
        self.held = ""
        self.num_tool_calls = 0

    def feed(self, text: str) -> list[dict]:
        if self.parser is None:
            return self._events([{"content": text}] if text else [])
        return self._events(self.parser.feed(text)) if text else []

    def finish(self) -> list[dict]:
        events = self._events(self.parser.finish()) if self.parser is not None else []
        self._close(events)
        return events

    def _events(self, deltas: list[dict]) -> list[dict]:
        events: list[dict] = []
        for delta in deltas:
            if "reasoning" in delta:
                self._text("thinking", delta["reasoning"], events)
            elif "content" in delta:
                self._text("text", delta["content"], events)
            else:
                call = delta["tool_calls"][0]
                if "id" in call:  # a new call
                    self.num_tool_calls += 1
                    self._open({"type": "tool_use", "id": tool_use_id(), "name": call["function"]["name"],
                                "input": {}}, events)
                if call["function"]["arguments"]:
                    events.append(self._delta({"type": "input_json_delta",
                                               "partial_json": call["function"]["arguments"]}))
        return events

    def _text(self, kind: str, text: str, events: list[dict]) -> None:
        if self.kind != kind:
            text, self.held = self.held + text, ""
            if not text.strip():
                self.held = text
                return
            self._open(dict(_START_BLOCKS[kind]), events)
        field = "text" if kind == "text" else "thinking"
        events.append(self._delta({"type": f"{field}_delta", field: text}))

    def _open(self, block: dict, events: list[dict]) -> None:
        self._close(events)
        self.index += 1
        self.kind = block["type"]
        events.append({"type": "content_block_start", "index": self.index, "content_block": block})

    def _close(self, events: list[dict]) -> None:
        self.held = ""
        if self.kind is None:
            return
        if self.kind == "thinking":
            events.append(self._delta({"type": "signature_delta", "signature": THINKING_SIGNATURE}))
        events.append({"type": "content_block_stop", "index": self.index})
        self.kind = None

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": self.index, "delta": delta}


def content_of(events: list[dict]) -> list[dict]:
    """A whole reply's `content`, rebuilt from its events as the anthropic client accumulates a stream."""
    content: list[dict] = []
    arguments: dict[int, str] = {}
    for event in events:
        kind = event["type"]
        if kind == "content_block_start":
            content.append(dict(event["content_block"]))
        elif kind == "content_block_delta":
            block, delta = content[event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            else:
                arguments[event["index"]] = arguments.get(event["index"], "") + delta["partial_json"]
    for index, text in arguments.items():
        content[index]["input"] = tool_input(text)
    return content


def tool_input(arguments: str) -> dict:
    """A call's arguments as the object Anthropic's `input` is; {} for arguments that are not a whole JSON
    object (a reply cut by max_tokens mid-call: its stop_reason says so)."""
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def stop_reason(finish_reason: str | None, stopped_by: int | str | None, num_tool_calls: int) -> tuple[str, str | None]:
    """(Anthropic's stop_reason, stop_sequence) of an engine finish reason and vLLM's stop_reason."""
    if finish_reason == "length":
        return "max_tokens", None
    if num_tool_calls:
        return "tool_use", None
    if isinstance(stopped_by, str):  # the stop string that ended the text
        return "stop_sequence", stopped_by
    return "end_turn", None
