"""GPT-OSS's harmony format, read from the output's text as it streams: messages framed by special tokens,
each with a header (a channel and, for a tool call, a recipient) and a body.

    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Oslo"}<|call|>
    <|start|>assistant<|channel|>final<|message|>The answer.<|return|>

The output starts inside the first message's header (the prompt ends with `<|start|>assistant`); the
recipient may also sit before the channel (`<|start|>assistant to=functions.f<|channel|>commentary json`).
`<|return|>` and `<|call|>` stop generation, so the last message usually ends with the text itself.

Why text and not token ids: OpenAI's `openai-harmony` parses token ids, but it fetches its tiktoken
encoding over the network at run time (none here, nor on many serving hosts), and our parsers are text
delta state machines behind one interface (server/chat_output.py). The framing tokens are special tokens
whose text a model cannot produce any other way, so with special tokens kept in the output text
(`keeps_special_tokens`) the text holds exactly what the token ids do.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from asyncserve.utils.text import held_prefix

START, END, MESSAGE, CHANNEL = "<|start|>", "<|end|>", "<|message|>", "<|channel|>"
CALL, RETURN = "<|call|>", "<|return|>"
MESSAGE_ENDS = (END, CALL, RETURN)
FUNCTIONS = "functions."
# How an output may open a message without <|start|> (the prompt wrote `<|start|>assistant`).
_HEADER_OPENINGS = (CHANNEL, " to=", "to=")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL_NAME = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")


@dataclass(frozen=True)
class Header:
    channel: str | None
    recipient: str | None

    @property
    def function(self) -> str | None:
        """The called function's name for a message to `functions.NAME`, else None."""
        if self.recipient and self.recipient.startswith(FUNCTIONS):
            return self.recipient[len(FUNCTIONS):]
        return None


def parse_header(text: str) -> Header:
    """'assistant<|channel|>commentary to=functions.f <|constrain|>json' -> Header('commentary', 'functions.f')."""
    channel, recipient = _CHANNEL_NAME.search(text), _RECIPIENT.search(text)
    return Header(channel.group(1) if channel else None, recipient.group(1) if recipient else None)


@dataclass(frozen=True)
class Opened:
    header: Header


@dataclass(frozen=True)
class Body:
    """Text of the open message, or (outside any message) text the model wrote without framing."""

    text: str


@dataclass(frozen=True)
class Closed:
    marker: str | None  # <|end|>, <|call|>, <|return|> (None: the output ended inside the message)


class HarmonyReader:
    """Text deltas in, events (Opened, Body, Closed) out. A marker cut across deltas is held back until
    it is whole, so every cut of a text gives the same events (bodies may split differently)."""

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "opening"  # opening -> header -> body -> outside -> header ...
        self._events: list = []

    def feed(self, text: str) -> list:
        self._buffer += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list:
        self._advance(final=True)
        if self._state == "body":
            self._events.append(Closed(None))
        self._state = "outside"
        return self._take()

    def _take(self) -> list:
        events, self._events = self._events, []
        return events

    def _advance(self, final: bool) -> None:
        while self._buffer:
            state = self._state
            if state == "opening":  # the output's first characters: a message's header, or plain text
                if self._buffer.startswith(_HEADER_OPENINGS):
                    self._state = "header"
                elif any(opening.startswith(self._buffer) for opening in _HEADER_OPENINGS) and not final:
                    return
                else:
                    self._state = "outside"
            elif state == "header":
                at = self._buffer.find(MESSAGE)
                if at < 0:
                    if final:  # a header that never opened its body: keep the text
                        self._events.append(Body(self._buffer))
                        self._buffer = ""
                    return
                self._events.append(Opened(parse_header(self._buffer[:at])))
                self._buffer, self._state = self._buffer[at + len(MESSAGE):], "body"
            elif state == "body":
                if not self._body(final):
                    return
            else:  # outside: text up to the next <|start|> (a model that writes no framing)
                at = self._buffer.find(START)
                if at < 0:
                    keep = 0 if final else held_prefix(self._buffer, START)
                    self._emit(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return
                self._emit(self._buffer[:at])
                self._buffer, self._state = self._buffer[at + len(START):], "header"

    def _body(self, final: bool) -> bool:
        """The open message's text up to its end marker; True if the marker came."""
        ends = [(self._buffer.find(marker), marker) for marker in MESSAGE_ENDS]
        found = [(at, marker) for at, marker in ends if at >= 0]
        if not found:
            keep = 0 if final else max(held_prefix(self._buffer, marker) for marker in MESSAGE_ENDS)
            self._emit(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            return False
        at, marker = min(found)
        self._emit(self._buffer[:at])
        self._events.append(Closed(marker))
        self._buffer, self._state = self._buffer[at + len(marker):], "outside"
        return True

    def _emit(self, text: str) -> None:
        if text:
            self._events.append(Body(text))
