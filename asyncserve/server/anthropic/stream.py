"""A streamed Messages reply: Anthropic's SSE events (`event: <type>` and `data: <json>`), written by the
engine's step through the chat path's stream sink, in Anthropic's order: message_start, ping, each block's
start, deltas and stop, message_delta (stop reason, usage), message_stop."""
from __future__ import annotations

from collections.abc import Callable

import orjson

from asyncserve.outputs import CompletionOutput, RequestOutput
from asyncserve.server.anthropic.blocks import ReplyBlocks, stop_reason
from asyncserve.server.anthropic.errors import error_event
from asyncserve.server.chat_output import ChoiceParser
from asyncserve.server.errors import ApiError
from asyncserve.server.serving import Cursor


def sse(event: dict) -> bytes:
    return b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def message_head(message_id: str, model: str) -> dict:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model}


class MessageStreamWriter:
    """The stream writer (server/serving.py's StreamWriter) of one Messages reply (n is always 1)."""

    def __init__(self, message_id: str, model: str, input_tokens: int,
                 make_parser: Callable[[], ChoiceParser] | None):
        self.head = message_head(message_id, model)
        self.input_tokens = input_tokens
        self.blocks = ReplyBlocks(make_parser)
        self.cursor = Cursor()

    def first_frame(self) -> bytes:
        message = {**self.head, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}
        return sse({"type": "message_start", "message": message}) + sse({"type": "ping"})

    def step_frame(self, batch: list[tuple[int, RequestOutput]]) -> bytes:
        return b"".join(self._completion_frame(output.outputs[0]) for _, output in batch)

    def _completion_frame(self, completion: CompletionOutput) -> bytes:
        if not self.cursor.advance(completion):
            return b""
        events = self.blocks.feed(completion.text)
        finish_reason = completion.finish_reason
        if finish_reason is not None:
            events += self.blocks.finish()
        frame = b"".join(map(sse, events))
        if finish_reason == "abort":  # the server is shutting down: the reply is not whole
            return frame + error_event(ApiError(503, "The request was aborted: the server is shutting down.",
                                                code="shutting_down"))
        if finish_reason is not None:
            reason, sequence = stop_reason(finish_reason, completion.stop_reason, self.blocks.num_tool_calls)
            frame += sse({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                          "usage": {"output_tokens": self.cursor.num_tokens}})
            frame += sse({"type": "message_stop"})
        return frame

    def usage_frame(self, usage: dict) -> bytes:
        return b""  # the usage went out in message_delta

    def completion_tokens(self) -> int:
        return self.cursor.num_tokens
