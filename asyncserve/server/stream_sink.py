"""One streaming client's end of the engine: each step's outputs become one SSE frame, written to the socket
from the engine's step handler; the client's own coroutine wakes only to drain a backlog or to finish.

A client whose socket buffer is past `HIGH_WATER` (a slow reader) never makes the step wait: its frames are
kept, in order, and its coroutine writes them with backpressure and the write timeout (server/serving.py).
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from asyncserve.outputs import RequestOutput

logger = logging.getLogger("asyncserve.server")

HIGH_WATER = 64 * 1024  # bytes unsent in a client's transport past which its frames wait for its coroutine


class StreamSink:
    """Collects a step's outputs of one HTTP request's engine requests (one per prompt) and, at the step's
    end, frames them once (`writer.step_frame`) and writes the frame, or keeps it for the coroutine. The
    outputs are deltas (`delta`): each step's new text, token ids and logprobs only."""

    delta = True

    def __init__(self, writer, on_batch):
        self.writer = writer  # CompletionStreamWriter or ChatStreamWriter
        self.on_batch = on_batch  # called with each step's [(prompt_index, output)] before it is framed
        self.num_unfinished = 0
        self.error: BaseException | None = None
        self.closed = False  # the client went away
        self._batch: list[tuple[int, RequestOutput]] = []
        self._pending: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._chunked = True
        self._draining = False  # the coroutine is writing: later frames queue behind what it writes
        self._wake = asyncio.Event()
        self._detached = False  # the coroutine has ended: what its requests' aborts produce goes nowhere

    def for_prompt(self, prompt_index: int) -> _PromptSink:
        self.num_unfinished += 1
        return _PromptSink(self, prompt_index)

    # ---- the engine's side (called on the loop, inside the engine's step; never raises) ----------

    def put(self, prompt_index: int, item: RequestOutput | BaseException) -> None:
        if self._detached:
            return
        if isinstance(item, BaseException):
            self.error = item
            self._wake.set()
            return
        self._batch.append((prompt_index, item))
        if item.finished:
            self.num_unfinished -= 1

    def end_step(self) -> None:
        batch = self._batch
        if not batch:
            return
        self._batch = []
        try:
            if len(batch) > 1:
                batch.sort(key=_prompt_index)
            self.on_batch(batch)
            frame = self.writer.step_frame(batch)
        except Exception as exc:  # a bug in framing: fail this stream, never the engine's step
            logger.exception("framing a streamed step failed")
            self.error = exc
            self._wake.set()
            return
        if frame:
            self._send(frame)
        if self.num_unfinished == 0:
            self._wake.set()

    def _send(self, frame: bytes) -> None:
        transport = self._transport
        if self._pending or self._draining or transport is None:
            self._pending.append(frame)
            self._wake.set()
            return
        if transport.is_closing():
            self.closed = True
            self._wake.set()
            return
        if transport.get_write_buffer_size() > HIGH_WATER:
            self._pending.append(frame)
            self._wake.set()
            return
        # HTTP/1.1 chunked coding, as aiohttp frames a StreamResponse's writes.
        transport.write(b"%x\r\n%b\r\n" % (len(frame), frame) if self._chunked else frame)

    # ---- the client's coroutine ------------------------------------------------------------------------

    async def start(self, request: web.Request, response: web.StreamResponse) -> None:
        """From now on frames may go straight to the socket (the response's headers are sent)."""
        writer = await response.prepare(request)  # already prepared: returns its payload writer
        self._chunked = bool(getattr(writer, "chunked", False))
        self._transport = request.transport

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0 and not self._batch and not self._pending

    async def wait(self) -> bytes:
        """Waits until there are frames for the coroutine to write, the outputs are complete, the client is
        gone or the engine failed; returns the frames (the caller writes them, then calls `written`)."""
        while not (self._pending or self.error or self.closed or self.finished):
            self._wake.clear()
            await self._wake.wait()
        if self.error is not None:
            raise self.error
        if self.closed:
            raise ConnectionResetError("the client went away")
        frames, self._pending = self._pending, []
        self._draining = bool(frames)
        return b"".join(frames)

    def written(self) -> None:
        self._draining = False

    def detach(self) -> None:
        """The coroutine is done with this stream (finished, or its client left)."""
        self._detached = True
        self._batch, self._pending = [], []


def _prompt_index(item: tuple[int, RequestOutput]) -> int:
    return item[0]


class _PromptSink:
    """The engine's sink for one prompt's request: tags its outputs with the prompt's index."""

    __slots__ = ("prompt_index", "sink")

    delta = True  # the engine's outputs for this request are deltas (OutputProcessor.delta_output)

    def __init__(self, sink: StreamSink, prompt_index: int):
        self.sink = sink
        self.prompt_index = prompt_index

    def put(self, item: RequestOutput | BaseException) -> None:
        self.sink.put(self.prompt_index, item)

    def end_step(self) -> None:
        self.sink.end_step()
