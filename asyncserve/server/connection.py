"""What one HTTP connection may cost the server: bounded body reads, bounded writes, quiet bad clients."""
from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from asyncserve.server.errors import ApiError

if sys.version_info >= (3, 11):
    from asyncio import timeout
else:  # aiohttp depends on async-timeout before 3.11
    from async_timeout import timeout

logger = logging.getLogger("asyncserve.server")

SERVER_NAME = "asyncserve"  # the `Server:` header: no versions for an attacker to match against
_MAX_ERROR_WORDS = 200  # characters of aiohttp's description of a malformed request


def _is_json(content_type: str) -> bool:
    return content_type == "application/json" or content_type.endswith("+json")


async def read_body(request: web.Request, limit: int, body_timeout: float) -> bytes:
    """The body, refused early: a non-JSON Content-Type (415), past `limit` bytes once inflated (413),
    not received within `body_timeout` seconds (408), or undecodable (400: a bad Content-Encoding)."""
    if "Content-Type" in request.headers and not _is_json(request.content_type):
        raise ApiError(415, f"The Content-Type must be application/json, got {request.content_type!r}.",
                       code="unsupported_media_type")
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"The request body is {request.content_length} bytes; the limit is {limit}.")
    chunks, size = [], 0
    try:
        async with timeout(body_timeout):
            # Chunks arrive inflated, a bounded piece at a time: a gzip bomb is stopped at `limit`.
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"The request body is over the limit of {limit} bytes.")
                chunks.append(chunk)
    except asyncio.TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {body_timeout:g} s.",
                       code="request_timeout") from None
    except web.RequestPayloadError as exc:
        raise ApiError(400, f"The request body could not be read: {exc.__cause__ or exc}.",
                       code="invalid_body") from None
    return b"".join(chunks)


async def send_and_close(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Answers, then closes the connection: a body left unread is never read on (nor inflated)."""
    response.force_close()
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left meanwhile: nothing to answer
    request.protocol.force_close()  # flushes what was written, then closes; no lingering read of the rest
    return response


async def write_within(request: web.Request, response: web.StreamResponse, data: bytes | None,
                       seconds: float) -> None:
    """Writes `data` (None: the end of the body); a client that reads nothing for `seconds` is cut off.

    Raises ConnectionResetError, as a client that left would: the caller's disconnect path aborts its work.
    """
    try:
        async with timeout(seconds):
            if data is None:
                await response.write_eof()
            else:
                await response.write(data)
    except asyncio.TimeoutError:
        transport = request.transport
        if transport is not None:
            transport.abort()  # drops what the client never read
        logger.warning("client %s read nothing for %g s; its request was aborted", request.remote, seconds)
        raise ConnectionResetError("stream write timed out") from None


async def drain_within(request: web.Request, response: web.StreamResponse, seconds: float) -> None:
    """Waits until the client has read enough of what was written (the transport is below its low-water
    mark); a client that reads nothing for `seconds` is cut off, as in `write_within`."""
    transport = request.transport
    if transport is None or transport.get_write_buffer_size() <= transport.get_write_buffer_limits()[1]:
        return
    try:
        async with timeout(seconds):
            writer = await response.prepare(request)  # prepared already: its payload writer
            await writer.drain()
    except ConnectionResetError:
        raise
    except ConnectionError as exc:  # aiohttp's "Connection lost" while waiting: the client left
        raise ConnectionResetError(str(exc)) from None
    except asyncio.TimeoutError:
        transport.abort()
        logger.warning("client %s read nothing for %g s; its request was aborted", request.remote, seconds)
        raise ConnectionResetError("stream write timed out") from None


async def set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER_NAME


def http_error_words(exc: HttpProcessingError) -> str:
    """aiohttp's description of a malformed request without the request bytes it quotes (up to 8 KB)."""
    words = []
    for line in exc.message.splitlines():
        for quote in ("b'", 'b"', "bytearray("):
            line = line.split(quote, 1)[0]
        line = line.strip().rstrip(":").strip()
        if line and line != "^":
            words.append(line)
    return ": ".join(words)[:_MAX_ERROR_WORDS] or "unreadable"


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs each malformed HTTP request as an ERROR with a traceback and the request's bytes; one
    short WARNING line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg, record.args = "malformed HTTP request from %s: %s", (remote, http_error_words(exc))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_malformed_request_logs() -> None:
    server_logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server_logger.filters):
        server_logger.addFilter(MalformedRequestFilter())
