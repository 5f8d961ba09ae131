"""What a tool-call parser hands out, delta by delta, and the one loop that turns its deltas into calls.

A parser is a small state machine fed the model's text in pieces (`feed`), then told the text is over
(`finish`). Whole-text extraction is the same machine fed once, so a stream and a non-streamed response
of the same text always hold the same calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from asyncserve.parsers.tool_calls.json_call import CallScanner


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A new call: its index among this choice's calls and the function's name (arguments follow)."""

    index: int
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


Delta = Union[ContentDelta, ToolCallStart, ArgumentsDelta]


@dataclass
class ToolCall:
    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


class ToolParser:
    """A stream of the model's text in, content and tool-call deltas out. Subclasses implement `_advance`."""

    name = ""
    # Whether the call markers may be special tokens, which a detokenizer skipping them would drop.
    keeps_special_tokens = False

    def __init__(self) -> None:
        self._buffer = ""
        self._deltas: list[Delta] = []
        self._num_calls = 0
        self._scanner: CallScanner | None = None

    def feed(self, text: str) -> list[Delta]:
        self._buffer += text
        self._advance(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        self._advance(final=True)
        if self._scanner is not None:
            self._end_call()
        return self._take()

    def extract(self, text: str) -> ExtractedToolCalls:
        """The whole text at once: the content outside the calls, and the calls."""
        return collect(self.feed(text) + self.finish())

    def _advance(self, final: bool) -> None:
        raise NotImplementedError

    # ---- helpers for subclasses -----------------------------------------------------------------

    def _content(self, text: str) -> None:
        if text:
            self._deltas.append(ContentDelta(text))

    def _start_scanner(self, argument_keys: tuple[str, ...]) -> None:
        self._scanner = CallScanner(argument_keys)

    def _scan(self) -> tuple[str, str]:
        """Feeds the buffer to the current call; ("more"|"done"|"failed", text consumed by this call).

        A call is announced once its name is known; its arguments follow as they are written.
        """
        scanner = self._scanner
        before = len(scanner.raw)
        status, pos = scanner.feed(self._buffer, 0)
        self._buffer = self._buffer[pos:]
        if scanner.name is not None:
            if not scanner.announced:
                scanner.announced = True
                self._deltas.append(ToolCallStart(self._num_calls, scanner.name))
            piece = scanner.take_arguments()
            if piece:
                self._deltas.append(ArgumentsDelta(self._num_calls, piece))
        return status.value, scanner.raw[before:]

    def _end_call(self) -> bool:
        """Closes the current call; False if it never got a name (its text was no call)."""
        scanner, self._scanner = self._scanner, None
        if scanner.name is None:
            return False
        piece = scanner.take_arguments(final=True)
        if piece:
            self._deltas.append(ArgumentsDelta(self._num_calls, piece))
        self._num_calls += 1
        return True

    def _take(self) -> list[Delta]:
        deltas, self._deltas = self._deltas, []
        return deltas


def collect(deltas: list[Delta]) -> ExtractedToolCalls:
    """Reassembles deltas into content and calls, as a client does with a stream."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            content.append(delta.text)
        elif isinstance(delta, ToolCallStart):
            calls.append(ToolCall(delta.name, ""))
        else:
            calls[delta.index].arguments += delta.text
    return ExtractedToolCalls("".join(content), calls)
