"""One JSON object `{"name": ..., "arguments": {...}}`, read a character at a time as the model writes it.

The arguments are passed on as the raw text the model wrote, piece by piece, so that what a stream sends
always concatenates to what a whole-text parse returns, however the text was cut into deltas.
"""
from __future__ import annotations

import json
from enum import Enum

_WHITESPACE = " \t\r\n"
_PRIMITIVE = frozenset("0123456789+-.eEtrufalsn")


class Status(Enum):
    MORE = "more"    # the object is not finished: feed more text
    DONE = "done"    # the object closed (its last character consumed)
    FAILED = "failed"  # a character that cannot continue a JSON object was met (not consumed)


class _Value:
    """Finds where one JSON value ends: nesting depth and strings, no full validation."""

    __slots__ = ("kind", "depth", "in_string", "escaped", "raw")

    def __init__(self, first: str):
        self.kind = "container" if first in "{[" else "string" if first == '"' else "primitive"
        self.depth = 1 if self.kind == "container" else 0
        self.in_string = self.kind == "string"
        self.escaped = False
        self.raw = first

    def take(self, char: str) -> bool | None:
        """Consumes `char`: True if it ended the value, None if it is not part of it (a primitive's end)."""
        if self.in_string:
            self.raw += char
            if self.escaped:
                self.escaped = False
            elif char == "\\":
                self.escaped = True
            elif char == '"':
                self.in_string = False
                return self.depth == 0
            return False
        if self.kind == "primitive":
            if char in _PRIMITIVE:
                self.raw += char
                return False
            return None
        self.raw += char
        if char == '"':
            self.in_string = True
        elif char in "{[":
            self.depth += 1
        elif char in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class CallScanner:
    """Reads `{"name": "f", "<one of argument_keys>": {...}}`; keys in any order, others skipped.

    `name` is set once the name string is whole; `take_arguments()` hands out the arguments' raw text
    written since the last call, but only once the name is known (a stream names the call first).
    """

    def __init__(self, argument_keys: tuple[str, ...] = ("arguments",)):
        self.argument_keys = argument_keys
        self.raw = ""          # everything consumed, for a caller that finds this was no call after all
        self.name: str | None = None
        self.announced = False  # whether the caller has sent the call's name on
        self._state = "open"
        self._key_raw = ""
        self._key: str | None = None
        self._value: _Value | None = None
        self._arguments = ""   # raw argument text seen so far
        self._arguments_sent = 0
        self._arguments_seen = False  # only the first arguments key counts
        self._in_arguments = False

    def feed(self, text: str, pos: int) -> tuple[Status, int]:
        """Consumes text[pos:] up to the object's end; returns the status and the position reached."""
        while pos < len(text):
            char = text[pos]
            status = self._step(char)
            if status is None:  # a primitive value ended just before `char`: read it again
                continue
            if status is Status.FAILED:
                return status, pos
            self.raw += char
            pos += 1
            if status is Status.DONE:
                return status, pos
        return Status.MORE, pos

    def take_arguments(self, final: bool = False) -> str:
        """Argument text not handed out yet ("{}" at the end of a call written without arguments)."""
        if self.name is None:
            return ""
        if final and not self._arguments_seen:
            self._arguments_seen = True
            self._arguments = "{}"
        piece = self._arguments[self._arguments_sent:]
        self._arguments_sent = len(self._arguments)
        return piece

    def _step(self, char: str) -> Status | None:
        state = self._state
        if state == "value":
            return self._value_step(char)
        if state == "key":
            self._key_raw += char
            if char == '"' and not _escaped(self._key_raw):
                try:
                    self._key = json.loads(self._key_raw)
                except ValueError:
                    return Status.FAILED
                self._state = "colon"
            return Status.MORE
        if char in _WHITESPACE:
            return Status.MORE
        if state == "open":
            if char != "{":
                return Status.FAILED
            self._state = "first_key"
        elif state in ("first_key", "next_key"):
            if char == "}" and state == "first_key":
                return Status.DONE
            if char != '"':
                return Status.FAILED
            self._key_raw, self._state = '"', "key"
        elif state == "colon":
            if char != ":":
                return Status.FAILED
            self._state = "value_start"
        elif state == "value_start":
            self._value, self._state = _Value(char), "value"
            if self._key in self.argument_keys and not self._arguments_seen:
                self._arguments_seen = True
                self._in_arguments = True
                if self._value.kind == "container":
                    self._arguments = char  # streamed as written
        elif state == "after_value":
            if char == ",":
                self._state = "next_key"
            elif char == "}":
                return Status.DONE
            else:
                return Status.FAILED
        return Status.MORE

    def _value_step(self, char: str) -> Status | None:
        value = self._value
        ended = value.take(char)
        if ended is None:  # not part of the value: the caller reads `char` again in "after_value"
            self._end_value()
            return None
        if self._in_arguments and value.kind == "container":
            self._arguments += char
        if ended:
            self._end_value()
        return Status.MORE

    def _end_value(self) -> None:
        value = self._value
        self._state = "after_value"
        if self._key == "name" and self.name is None and value.kind == "string":
            try:
                self.name = json.loads(value.raw)
            except ValueError:
                pass
        elif self._in_arguments and value.kind != "container":
            # Arguments written as a JSON string holding JSON: the string's contents are the arguments.
            self._arguments = _decoded_string(value.raw) if value.kind == "string" else value.raw
        self._in_arguments = False


def _escaped(raw: str) -> bool:
    """Whether the last character of a string token so far is escaped (an odd run of backslashes)."""
    run = len(raw) - 1 - len(raw[:-1].rstrip("\\"))
    return run % 2 == 1


def _decoded_string(raw: str) -> str:
    try:
        return json.loads(raw)
    except ValueError:
        return raw
