"""`hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Qwen2.5/Qwen3 and many
fine-tunes (Hermes, Qwen-based agents) write tool calls; text outside the tags is content."""
from __future__ import annotations

from asyncserve.parsers.tool_calls.base import ToolParser
from asyncserve.utils.text import held_prefix
from asyncserve.parsers.tool_calls.registry import register

START, END = "<tool_call>", "</tool_call>"
_WHITESPACE = " \t\r\n"


@register("hermes")
class HermesToolParser(ToolParser):
    keeps_special_tokens = True  # <tool_call> is a special token in some fine-tunes' tokenizers (as vLLM)

    def __init__(self) -> None:
        super().__init__()
        self._mode = "text"
        self._opening = ""  # "<tool_call>" and the whitespace after it: content if no JSON object follows

    def _advance(self, final: bool) -> None:
        while True:
            mode = self._mode
            if mode == "text":
                if not self._text(final):
                    return
            elif mode == "open":
                stripped = self._buffer.lstrip(_WHITESPACE)
                self._opening += self._buffer[:len(self._buffer) - len(stripped)]
                self._buffer = stripped
                if not stripped:
                    if final:
                        self._content(self._opening)
                    return
                if stripped[0] == "{":
                    self._start_scanner(("arguments", "parameters"))
                    self._mode = "call"
                else:  # not a JSON call: the tag was plain text
                    self._content(self._opening)
                    self._mode = "text"
            elif mode == "call":
                status, consumed = self._scan()
                self._opening += consumed
                if status == "more":
                    if final and not self._end_call():
                        self._content(self._opening)
                    return
                if self._end_call():
                    self._mode = "close" if status == "done" else "skip"
                else:
                    if status == "failed":  # the character that broke it is text too
                        consumed, self._buffer = self._buffer[:1], self._buffer[1:]
                        self._opening += consumed
                    self._content(self._opening)
                    self._mode = "text"
            elif mode == "close":
                stripped = self._buffer.lstrip(_WHITESPACE)
                if not stripped:
                    return
                if stripped.startswith(END):
                    # whitespace after a call (between calls, or at the end) is layout, not content
                    self._buffer, self._mode = stripped[len(END):].lstrip(_WHITESPACE), "gap"
                elif END.startswith(stripped) and not final:
                    return
                else:
                    self._buffer, self._mode = stripped, "text"
            elif mode == "gap":
                self._buffer = self._buffer.lstrip(_WHITESPACE)
                if not self._buffer:
                    return
                self._mode = "text"
            else:  # "skip": a broken call's remains, up to its closing tag
                at = self._buffer.find(END)
                if at < 0:
                    keep = held_prefix(self._buffer, END)
                    self._buffer = self._buffer[len(self._buffer) - keep:] if keep else ""
                    return
                self._buffer, self._mode = self._buffer[at + len(END):], "text"

    def _text(self, final: bool) -> bool:
        """Content up to the next `<tool_call>`; True if one was found. A possible tag start is held back."""
        buffer = self._buffer
        at = buffer.find(START)
        if at >= 0:
            self._content(buffer[:at])
            self._buffer, self._opening, self._mode = buffer[at + len(START):], START, "open"
            return True
        keep = 0 if final else held_prefix(buffer, START)
        self._content(buffer[:len(buffer) - keep])
        self._buffer = buffer[len(buffer) - keep:]
        return False
