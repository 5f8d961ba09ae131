"""Parsers for outputs a grammar forced: tool_choice "required" (a JSON array of `{"name", "parameters"}`
objects) and a named function (the output is that function's arguments, nothing else)."""
from __future__ import annotations

from asyncserve.parsers.tool_calls.base import ArgumentsDelta, ToolCallStart, ToolParser

_WHITESPACE = " \t\r\n"


class NamedFunctionParser(ToolParser):
    """The whole output is the arguments of `function`."""

    def __init__(self, function: str):
        super().__init__()
        self.function = function

    def _advance(self, final: bool) -> None:
        if self._num_calls == 0:
            self._deltas.append(ToolCallStart(0, self.function))
            self._num_calls = 1
        if self._buffer:
            self._deltas.append(ArgumentsDelta(0, self._buffer))
            self._buffer = ""


class RequiredCallsParser(ToolParser):
    """`[{"name": "f", "parameters": {...}}, ...]`: each object one call."""

    def __init__(self) -> None:
        super().__init__()
        self._mode = "open"

    def _advance(self, final: bool) -> None:
        while True:
            stripped = self._buffer.lstrip(_WHITESPACE)
            if self._mode == "open":
                if not stripped:
                    return
                self._buffer, self._mode = (stripped[1:], "between") if stripped[0] == "[" else (stripped, "end")
            elif self._mode == "between":
                stripped = stripped.lstrip(_WHITESPACE + ",")
                self._buffer = stripped
                if not stripped:
                    return
                if stripped[0] != "{":
                    self._mode = "end"
                    continue
                self._start_scanner(("parameters", "arguments"))
                self._mode = "call"
            elif self._mode == "call":
                status, _ = self._scan()
                if status == "more":
                    return
                self._end_call()
                self._mode = "between" if status == "done" else "end"
            else:  # "end": the grammar allows nothing after the array
                self._buffer = ""
                return
