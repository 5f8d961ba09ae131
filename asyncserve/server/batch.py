"""`asyncserve run-batch`: a batch file's requests through the server's own app, many at once, answers written
in input order.

Each line is sent over HTTP to the very app `asyncserve serve` runs, listening on a Unix socket in a private
temporary folder (nothing else can reach it): the same middlewares, validation, handlers and JSON encoding, so
a line's answer is byte for byte what the server answers (ids and timestamps aside), errors included, with
nothing to keep in step. The engine batches the requests in flight as it batches a server's clients.
"""
from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web

from asyncserve.server.batch_lines import (
    BatchLine,
    error_record,
    parse_line,
    response_record,
)
from asyncserve.server.errors import ApiError

logger = logging.getLogger("asyncserve")

# Requests in flight: enough to keep the engine's batch full with a queue behind it; the rest wait unread.
MIN_IN_FLIGHT = 256
# Answers held for writing behind one slow line, per request in flight: bounds memory, not throughput.
BUFFERED_PER_IN_FLIGHT = 4


@dataclass
class BatchSummary:
    lines: int = 0
    succeeded: int = 0  # answered 200
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.lines - self.succeeded


@asynccontextmanager
async def app_on_private_socket(app: web.Application) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session talking to `app` served on a Unix socket in a fresh 0700 folder; the app (and its
    engine) starts on entry and is cleaned up on exit."""
    with tempfile.TemporaryDirectory(prefix="asyncserve-batch-") as folder:
        path = os.path.join(folder, "api.sock")
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.UnixSite(runner, path).start()
            connector = aiohttp.UnixConnector(path, limit=0)  # in-flight work is bounded by run_batch
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) \
                    as session:
                yield session
        finally:
            await runner.cleanup()


async def answer(session: aiohttp.ClientSession, line: BatchLine) -> dict:
    """The line's output record: the server's answer, or why the line was not sent."""
    if line.error is not None:
        return error_record(line.custom_id, line.error)
    try:
        async with session.post("http://batch" + line.url, data=line.body,
                                headers={"Content-Type": "application/json"}) as response:
            status, payload = response.status, await response.read()
        return response_record(line.custom_id, status, orjson.loads(payload))
    except (aiohttp.ClientError, orjson.JSONDecodeError) as exc:  # never expected: the record says what broke
        logger.exception("run-batch: line %d (custom_id %r) failed in transit", line.number, line.custom_id)
        return error_record(line.custom_id, ApiError(500, f"Line {line.number}: the request failed inside "
                                                          f"run-batch ({type(exc).__name__}: {exc}).",
                                                     code="internal_error"))


async def run_batch(session: aiohttp.ClientSession, lines: Iterable[str | bytes], write: Callable[[dict], None],
                    *, max_in_flight: int = MIN_IN_FLIGHT, on_answer: Callable[[dict], None] | None = None
                    ) -> BatchSummary:
    """Sends every non-blank line (at most `max_in_flight` at once) and calls `write` with each record, in
    input order, as soon as the records before it are written; `on_answer` hears of each as it arrives."""
    summary, started = BatchSummary(), time.perf_counter()
    seats = asyncio.Semaphore(max_in_flight)
    pending: deque[asyncio.Task] = deque()
    seen_ids: set[str] = set()

    async def one(line: BatchLine) -> dict:
        try:
            record = await answer(session, line)
        finally:
            seats.release()  # taken by the reader below
        if on_answer is not None:
            on_answer(record)
        return record

    def emit(record: dict) -> None:
        summary.succeeded += record["response"]["status_code"] == 200
        write(record)

    try:
        for number, text in enumerate(lines, 1):
            if not text.strip():
                continue  # a blank line holds no request (a file's last newline, a gap)
            summary.lines += 1
            while len(pending) >= max_in_flight * BUFFERED_PER_IN_FLIGHT:
                emit(await pending.popleft())
            await seats.acquire()  # read no further ahead than the requests in flight
            pending.append(asyncio.ensure_future(one(parse_line(number, text, seen_ids))))
            while pending and pending[0].done():
                emit(pending.popleft().result())
        while pending:
            emit(await pending.popleft())
    finally:
        for task in pending:
            task.cancel()
    summary.seconds = time.perf_counter() - started
    return summary

