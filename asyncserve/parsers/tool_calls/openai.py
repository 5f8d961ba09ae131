"""`openai` (vLLM's name): GPT-OSS's tool calls, harmony messages to `functions.NAME` whose body is the
arguments (`<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>`).
Reads the raw harmony output, or the content the `openai_gptoss` reasoning parser leaves (plain text with
the calls still framed). Every other message's text is content (with no reasoning parser, the analysis
channel's too)."""
from __future__ import annotations

from asyncserve.parsers.harmony import Body, Closed, HarmonyReader, Opened
from asyncserve.parsers.tool_calls.base import ArgumentsDelta, ToolCallStart, ToolParser
from asyncserve.parsers.tool_calls.registry import register


@register("openai")
class OpenAIToolParser(ToolParser):
    keeps_special_tokens = True  # harmony's framing is special tokens

    def __init__(self) -> None:
        super().__init__()
        self._reader = HarmonyReader()
        self._in_call = False

    def feed(self, text: str) -> list:
        self._read(self._reader.feed(text))
        return self._take()

    def finish(self) -> list:
        self._read(self._reader.finish())
        return self._take()

    def _read(self, events: list) -> None:
        for event in events:
            if isinstance(event, Opened):
                function = event.header.function
                self._in_call = function is not None
                if self._in_call:
                    self._deltas.append(ToolCallStart(self._num_calls, function))
            elif isinstance(event, Body):
                if self._in_call:
                    self._deltas.append(ArgumentsDelta(self._num_calls, event.text))
                else:
                    self._content(event.text)
            elif isinstance(event, Closed) and self._in_call:
                self._in_call = False
                self._num_calls += 1
