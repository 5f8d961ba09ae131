"""`llama3_json`: Llama 3.1/3.2's JSON tool calls, `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by ";". Only an output that starts with one is a tool call (as vLLM)."""
from __future__ import annotations

from asyncserve.parsers.tool_calls.base import ToolParser
from asyncserve.parsers.tool_calls.registry import register

PYTHON_TAG = "<|python_tag|>"
_WHITESPACE = " \t\r\n"


@register("llama3_json")
class Llama3JsonToolParser(ToolParser):

    def __init__(self) -> None:
        super().__init__()
        self._mode = "start"
        self._held = ""  # text read in this call: content if it turns out to be no call

    def _advance(self, final: bool) -> None:
        while True:
            mode = self._mode
            if mode == "content":
                self._content(self._buffer)
                self._buffer = ""
                return
            if mode == "start":
                stripped = self._buffer.lstrip(_WHITESPACE)
                if stripped.startswith(PYTHON_TAG):
                    self._buffer, self._mode = stripped[len(PYTHON_TAG):], "between"
                elif stripped.startswith("{"):
                    self._buffer, self._mode = stripped, "between"
                elif stripped and not (PYTHON_TAG.startswith(stripped) and not final):
                    self._mode = "content"
                elif final:
                    self._mode = "content"
                else:
                    return
            elif mode == "between":  # before a call, or after one: ";" and whitespace separate calls
                stripped = self._buffer.lstrip(_WHITESPACE + ";")
                if not stripped:
                    self._buffer = ""
                    return
                self._buffer = stripped
                if stripped[0] == "{":
                    self._start_scanner(("parameters", "arguments"))
                    self._held, self._mode = "", "call"
                else:
                    self._mode = "content"
            else:  # "call"
                status, consumed = self._scan()
                self._held += consumed
                if status == "more":
                    if final and not self._end_call():
                        self._content(self._held)
                    return
                named = self._end_call()
                if not named:
                    self._content(self._held)
                self._mode = "between" if status == "done" and named else "content"
