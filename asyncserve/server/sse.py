"""Server-sent events, pre-encoded: the fields every chunk of a response shares are serialised once."""
from __future__ import annotations

import orjson
from aiohttp import web

DONE = b"data: [DONE]\n\n"


def event(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChunkEncoder:
    """Frames `{id, object, created, model, choices: [one choice]}` chunks, one SSE event per choice."""

    def __init__(self, response_id: str, object_name: str, created: int, model: str, include_usage: bool,
                 chat: bool):
        head = {"id": response_id, "object": object_name, "created": created, "model": model}
        if chat:
            head["system_fingerprint"] = None
        self._head = head
        self._prefix = b"data: " + orjson.dumps(head)[:-1] + b',"choices":['
        self._suffix = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def frame(self, choices: list[dict], usages: list[dict] | None = None) -> bytes:
        """One write's worth of events: each choice in its own chunk, as OpenAI sends them; `usages`
        (vLLM's continuous usage stats) puts each choice's usage so far in its chunk instead of null."""
        prefix, suffix = self._prefix, self._suffix
        if usages is None:
            return b"".join(prefix + orjson.dumps(choice) + suffix for choice in choices)
        return b"".join(prefix + orjson.dumps(choice) + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"
                        for choice, usage in zip(choices, usages))

    def head_frame(self, choices: list[dict], **fields) -> bytes:
        """One chunk with fields beside the shared ones (vLLM's `prompt_token_ids` in a stream's first)."""
        return event({**self._head, **fields, "choices": choices})

    def usage_frame(self, usage: dict) -> bytes:
        return event({**self._head, "choices": [], "usage": usage})


async def open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                           "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response
