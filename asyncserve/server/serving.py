"""Running a Generation for one HTTP request: a stream of SSE frames, or one JSON body at the end."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Protocol, TypeVar

import orjson
from aiohttp import web

from asyncserve.errors import AsyncServeError
from asyncserve.outputs import CompletionOutput, RequestOutput
from asyncserve.server.connection import drain_within, read_body, write_within
from asyncserve.server.errors import ApiError, api_error_from, error_payload
from asyncserve.server.generation import Generation
from asyncserve.server.image_urls import PendingImages, download_images, find_image_urls
from asyncserve.server.sse import DONE, event, open_stream
from asyncserve.server.state import ServerState
from asyncserve.server.stream_sink import StreamSink

logger = logging.getLogger("asyncserve.server")

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request": nobody reads it, the access log shows it


# Bodies from this size on are parsed, rendered and tokenized in the worker thread: a 16 KiB prompt
# tokenizes in about 9 ms on this machine, and the hop to the thread and back costs about 0.04 ms.
OFFLOAD_BYTES = 16 * 1024
# Non-streamed responses with more token entries (tokens x (1 + top logprobs)) than this are built and
# encoded in the worker thread, one choice at a time (about 10 ms of work on one core).
OFFLOAD_RESPONSE_ENTRIES = 20_000


async def read_and_prepare(request: web.Request, state: ServerState, prepare: Callable[[ServerState, object], T],
                           always_offload: bool = False, image_urls: bool = False) -> T:
    """Reads the body, then `prepare(state, parsed JSON)`: in the worker thread for a big body (or for
    every body with `always_offload`), so that neither parsing, tokenizing nor freeing millions of token ids
    holds the loop. With `image_urls` (chat messages), http(s) image URLs are downloaded on the loop between
    parsing and preparing (server/image_urls.py); the body then always goes to the worker thread, whose
    image decoding it needs."""
    body = await read_body(request, state.max_body_bytes, state.request_body_timeout)
    prepared = await state.run(always_offload or len(body) >= OFFLOAD_BYTES, _parse_and_prepare, prepare, state,
                               body, image_urls)
    if isinstance(prepared, PendingImages):
        data = await download_images(request, prepared)
        prepared = await state.run(True, prepare, state, data)
    return prepared


def _parse_and_prepare(prepare, state: ServerState, body: bytes, image_urls: bool = False):
    from asyncserve.server.protocol import parse_json
    data = parse_json(body)
    if image_urls:
        pending = find_image_urls(state, data)
        if pending is not None:
            return pending
    return prepare(state, data)


class Cursor:
    """How much of one choice a client has been sent. A stream's outputs are deltas (the engine's
    OutputProcessor.delta_output): each carries only the choice's new text, token ids and logprobs."""

    __slots__ = ("text_len", "num_tokens", "done")

    def __init__(self) -> None:
        self.text_len = 0
        self.num_tokens = 0
        self.done = False

    def advance(self, completion: CompletionOutput) -> bool:
        """Counts a delta in; False when it brings nothing to send (nothing new, or the choice had ended)."""
        if self.done:
            return False
        finish_reason = completion.finish_reason
        if not completion.text and not completion.token_ids and finish_reason is None:
            return False
        self.text_len += len(completion.text)
        self.num_tokens += len(completion.token_ids)
        self.done = finish_reason is not None
        return True


class StreamWriter(Protocol):
    """What an endpoint adds to the shared streaming loop: its own chunk shapes."""

    def first_frame(self) -> bytes: ...

    def step_frame(self, batch: list[tuple[int, RequestOutput]]) -> bytes: ...

    def usage_frame(self, usage: dict) -> bytes: ...

    def completion_tokens(self) -> int: ...


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def usage(generation: Generation, latest: dict[int, RequestOutput]) -> dict:
    prompt_tokens = sum(len(prompt.token_ids) for prompt in generation.prompts)
    completion_tokens = sum(len(choice.token_ids) for output in latest.values() for choice in output.outputs)
    return token_usage(prompt_tokens, completion_tokens)


def _record(state: ServerState, latest: dict[int, RequestOutput], batch) -> None:
    """Keeps each prompt's newest output; finished ones feed the latency histograms."""
    for index, output in batch:
        latest[index] = output
        if output.finished:
            state.metrics.observe_finished(output)


def _record_finished(state: ServerState, batch) -> None:
    """A stream's finished outputs (deltas; the last one lists every choice) feed the latency histograms."""
    for _, output in batch:
        if output.finished:
            state.metrics.observe_finished(output)


def stream_sink(state: ServerState, writer: StreamWriter) -> StreamSink:
    """The sink a streamed Generation feeds: its outputs are deltas, counted by the writer's cursors."""
    return StreamSink(writer, lambda batch: _record_finished(state, batch))


def openai_error_event(error: ApiError) -> bytes:
    return event(error_payload(error.status, error.message, error.param, error.code))


async def stream(request: web.Request, state: ServerState, generation: Generation, sink: StreamSink,
                 include_usage: bool, end: bytes = DONE,
                 error_event: Callable[[ApiError], bytes] = openai_error_event) -> web.StreamResponse:
    """One SSE frame per engine step, written by the step itself (server/stream_sink.py); this coroutine
    writes the first frame, a slow client's backlog and the end. A client that goes away aborts its requests
    (their KV is freed). `end` closes the stream (OpenAI's `[DONE]`), `error_event` frames a failure after
    the headers went out: Anthropic's stream has other shapes for both."""
    writer = sink.writer
    response = None
    write_timeout = state.stream_write_timeout
    state.track(generation)
    try:
        response = await open_stream(request)
        first = writer.first_frame()
        if first:
            await write_within(request, response, first, write_timeout)
        await sink.start(request, response)
        while not sink.finished:
            frames = await sink.wait()
            if frames:
                await write_within(request, response, frames, write_timeout)
                await drain_within(request, response, write_timeout)
            sink.written()
        prompt_tokens = sum(len(prompt.token_ids) for prompt in generation.prompts)
        tail = writer.usage_frame(token_usage(prompt_tokens, writer.completion_tokens())) if include_usage \
            else b""
        if tail + end:
            await write_within(request, response, tail + end, write_timeout)
        await write_within(request, response, None, write_timeout)
    except ConnectionResetError:
        logger.debug("client left %s; its requests were aborted", generation.request_ids)
    except AsyncServeError as exc:  # the engine died mid-stream: the status is sent, say so in-band
        error = api_error_from(exc)
        with contextlib.suppress(ConnectionResetError):
            await write_within(request, response, error_event(error) + end, write_timeout)
            await write_within(request, response, None, write_timeout)
    finally:
        sink.detach()
        generation.abort()  # no-op for finished requests
        state.untrack(generation)
    return response if response is not None else client_closed()


async def collect(request: web.Request, state: ServerState, generation: Generation,
                  abort_is_shutdown: bool = True) -> dict[int, RequestOutput] | None:
    """Final outputs by prompt index; None when the client left (its requests are aborted). An aborted
    output is a 503 (the server is shutting down) unless the caller tells aborts apart itself
    (`abort_is_shutdown` false: a cancelled response)."""
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
    if abort_is_shutdown and any(choice.finish_reason == "abort" for output in latest.values()
                                 for choice in output.outputs):
        raise ApiError(503, "The request was aborted: the server is shutting down.", code="shutting_down")
    return latest


def json_response(payload: dict) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def response_entries(latest: dict[int, RequestOutput], num_top: int | None, echo: bool = False,
                     prompt_top: int | None = None) -> int:
    """How many token entries a non-streamed body holds: what its building and encoding cost.
    `prompt_top`: the body also holds each choice's prompt logprobs, this many alternatives a token."""
    num_tokens = sum(len(choice.token_ids) + (len(output.prompt_token_ids) if echo else 0)
                     for output in latest.values() for choice in output.outputs)
    entries = num_tokens * (1 + (num_top or 0))
    if prompt_top is not None:
        entries += sum(len(output.prompt_token_ids) * len(output.outputs) for output in latest.values()) * \
            (2 + prompt_top)
    return entries


def encode_json(head: dict, choices: Iterable[dict]) -> bytes:
    """`{**head, "choices": [...]}` as JSON, each choice built and encoded in turn: a 30 MB body never
    holds the GIL in one call, nor lives as millions of Python objects (which full collections walk)."""
    fields = {key: value for key, value in head.items() if key != "usage"}
    encoded = orjson.dumps(fields)[:-1] + (b"," if fields else b"") + b'"choices":['
    encoded += b",".join(map(orjson.dumps, choices)) + b"]"
    if "usage" in head:  # last, where OpenAI puts it
        encoded += b',"usage":' + orjson.dumps(head["usage"])
    return encoded + b"}"


async def send_json(request: web.Request, state: ServerState, body: bytes) -> web.StreamResponse:
    """Sends a generated body; a client that does not read it within the write timeout is cut off."""
    response = web.Response(body=body, content_type="application/json")
    with contextlib.suppress(ConnectionResetError):
        await response.prepare(request)
        await write_within(request, response, None, state.stream_write_timeout)
    return response


def client_closed() -> web.Response:
    return web.Response(status=CLIENT_CLOSED)


def log_request(state: ServerState, request_id: str, endpoint: str, generation: Generation,
                streamed: bool) -> None:
    if state.log_requests:
        params = generation.params
        logger.info("%s %s: %s prompt tokens, n=%d, max_tokens=%s, temperature=%g, stream=%s",
                    endpoint, request_id, "+".join(str(len(p.token_ids)) for p in generation.prompts),
                    params.n, params.max_tokens, params.temperature, streamed)
