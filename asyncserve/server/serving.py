"""Running a Generation for one HTTP request: a stream of SSE frames, or one JSON body at the end."""
from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import orjson
from aiohttp import web

from asyncserve.errors import AsyncServeError
from asyncserve.outputs import CompletionOutput, RequestOutput
from asyncserve.server.errors import ApiError, api_error_from, error_payload
from asyncserve.server.generation import Generation
from asyncserve.server.sse import DONE, event, open_stream
from asyncserve.server.state import ServerState

logger = logging.getLogger("asyncserve.server")

CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the access log shows it


async def read_json(request: web.Request, limit: int):
    """The body as JSON; 413 past `limit` bytes, without reading further."""
    from asyncserve.server.protocol import parse_json
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"The request body is {request.content_length} bytes; the limit is {limit}.")
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"The request body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    return parse_json(b"".join(chunks))


class Cursor:
    """How much of one choice a client has been sent."""

    __slots__ = ("text_len", "num_tokens", "done")

    def __init__(self) -> None:
        self.text_len = 0
        self.num_tokens = 0
        self.done = False

    def advance(self, completion: CompletionOutput) -> tuple[str, int, str | None] | None:
        """(text since last time, index of the first new token, finish reason or None); None if nothing new."""
        if self.done:
            return None
        text = completion.text[self.text_len:] if len(completion.text) > self.text_len else ""
        first_new = self.num_tokens
        finish_reason = completion.finish_reason
        if not text and first_new == len(completion.token_ids) and finish_reason is None:
            return None
        self.text_len += len(text)
        self.num_tokens = len(completion.token_ids)
        self.done = finish_reason is not None
        return text, first_new, finish_reason


class StreamWriter(Protocol):
    """What an endpoint adds to the shared streaming loop: its own chunk shapes."""

    def first_frame(self) -> bytes: ...

    def step_frame(self, batch: list[tuple[int, RequestOutput]]) -> bytes: ...

    def usage_frame(self, usage: dict) -> bytes: ...


def usage(generation: Generation, latest: dict[int, RequestOutput]) -> dict:
    prompt_tokens = sum(len(prompt.token_ids) for prompt in generation.prompts)
    completion_tokens = sum(len(choice.token_ids) for output in latest.values() for choice in output.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _record(state: ServerState, latest: dict[int, RequestOutput], batch) -> None:
    """Keeps each prompt's newest output; finished ones feed the latency histograms."""
    for index, output in batch:
        latest[index] = output
        if output.finished:
            state.metrics.observe_finished(output)


async def stream(request: web.Request, state: ServerState, generation: Generation, writer: StreamWriter,
                 include_usage: bool) -> web.StreamResponse:
    """One SSE frame per engine step; a client that goes away aborts its requests (their KV is freed)."""
    latest: dict[int, RequestOutput] = {}
    response = None
    state.track(generation)
    try:
        response = await open_stream(request)
        first = writer.first_frame()
        if first:
            await response.write(first)
        async with contextlib.aclosing(generation.outputs()) as batches:
            async for batch in batches:
                _record(state, latest, batch)
                frame = writer.step_frame(batch)
                if frame:
                    await response.write(frame)
        tail = writer.usage_frame(usage(generation, latest)) if include_usage else b""
        await response.write(tail + DONE)
        await response.write_eof()
    except ConnectionResetError:
        logger.debug("client left %s; its requests were aborted", generation.request_ids)
    except AsyncServeError as exc:  # the engine died mid-stream: the status is sent, say so in-band
        error = api_error_from(exc)
        with contextlib.suppress(ConnectionResetError):
            await response.write(event(error_payload(error.status, error.message, error.param, error.code))
                                 + DONE)
            await response.write_eof()
    finally:
        generation.abort()  # no-op for finished requests; covers a generator that never started
        state.untrack(generation)
    return response if response is not None else client_closed()


async def collect(request: web.Request, state: ServerState,
                  generation: Generation) -> dict[int, RequestOutput] | None:
    """Final outputs by prompt index; None when the client left (its requests are aborted)."""
    latest: dict[int, RequestOutput] = {}
    state.track(generation)
    try:
        async with contextlib.aclosing(generation.outputs()) as batches:
            async for batch in batches:
                _record(state, latest, batch)
                transport = request.transport
                if transport is None or transport.is_closing():
                    return None
    finally:
        generation.abort()
        state.untrack(generation)
    if any(choice.finish_reason == "abort" for output in latest.values() for choice in output.outputs):
        raise ApiError(503, "The request was aborted: the server is shutting down.", code="shutting_down")
    return latest


def json_response(payload: dict) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def client_closed() -> web.Response:
    return web.Response(status=CLIENT_CLOSED)


def log_request(state: ServerState, request_id: str, endpoint: str, generation: Generation,
                streamed: bool) -> None:
    if state.log_requests:
        params = generation.params
        logger.info("%s %s: %s prompt tokens, n=%d, max_tokens=%s, temperature=%g, stream=%s",
                    endpoint, request_id, "+".join(str(len(p.token_ids)) for p in generation.prompts),
                    params.n, params.max_tokens, params.temperature, streamed)
