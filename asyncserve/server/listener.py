"""The CLI server's connections: bounded in number and idle time, and malformed HTTP answered in JSON.

aiohttp's keep-alive timer runs from a connection's start (aiohttp >= 3.14.4) and from the end of each
response, so `keepalive_timeout` bounds both how long a kept-alive connection may idle and how long a client
may take to send a request head (a half-sent head is closed as an idle connection). What aiohttp lacks is a
bound on the number of connections, which keeps a flood of idle sockets from taking every file descriptor,
and an OpenAI-shaped body for requests its HTTP parser refuses; both are here, as a protocol subclass and a
site (aiohttp's unit for "a listening socket").
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from asyncserve.errors import ConfigError
from asyncserve.server.connection import SERVER_NAME, http_error_words
from asyncserve.server.errors import error_payload

logger = logging.getLogger("asyncserve.server")

# The request line may be longer than one header field, and the two limits differ so that aiohttp's
# LineTooLong, which carries the limit it hit, tells a 414 from a 431.
MAX_REQUEST_LINE_BYTES = 16384
MAX_HEADER_FIELD_BYTES = 8190  # aiohttp's default, name and value together
MAX_HEADERS = 128  # aiohttp's default
FD_RESERVE = 128  # descriptors kept for the process itself (model files, pipes, logs) below the fd limit
_LOG_INTERVAL = 10.0  # seconds between two warnings about the connection limit


@dataclass(frozen=True)
class ConnectionLimits:
    """`--timeout-keep-alive` and `--max-connections` (None: the open-file limit less FD_RESERVE)."""
    keepalive_timeout: float = 5.0
    max_connections: int | None = None

    def __post_init__(self) -> None:
        if not self.keepalive_timeout > 0:
            raise ConfigError(f"--timeout-keep-alive must be > 0 seconds, got {self.keepalive_timeout}")
        if self.max_connections is not None and self.max_connections < 1:
            raise ConfigError(f"--max-connections must be >= 1, got {self.max_connections}")

    def connection_cap(self) -> int | None:
        return self.max_connections if self.max_connections is not None else default_max_connections()


def raise_open_file_limit(target: int = 65535) -> None:
    """Raises the soft open-file limit towards `target` within the hard limit, as vLLM does."""
    try:
        import resource  # POSIX only
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(target, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            pass


def default_max_connections() -> int | None:
    """The open-file limit less what the process itself needs; None where there is no limit."""
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - FD_RESERVE, soft // 2, 1)


def handler_options(limits: ConnectionLimits, access_log: logging.Logger | None) -> dict:
    """aiohttp's RequestHandler options for these limits (the same for the runner's and the site's)."""
    return {"access_log": access_log, "keepalive_timeout": limits.keepalive_timeout,
            "max_line_size": MAX_REQUEST_LINE_BYTES, "max_field_size": MAX_HEADER_FIELD_BYTES,
            "max_headers": MAX_HEADERS}


def _malformed_request_error(exc: BaseException | None, status: int) -> tuple[int, str, str | None]:
    """(status, message, code) of what aiohttp's parser refused; other failures keep their status."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else None
        if limit == MAX_REQUEST_LINE_BYTES:
            return 414, f"The request line is longer than {limit} bytes.", "uri_too_long"
        return 431, f"A header field is longer than {limit} bytes.", "header_fields_too_large"
    if isinstance(exc, HttpProcessingError):
        if exc.message == "Too many headers received":
            return 431, f"The request has more than {MAX_HEADERS} header fields.", "header_fields_too_large"
        return 400, f"Malformed HTTP request: {http_error_words(exc)}.", "malformed_http"
    if status == 500:
        return 500, "Internal server error; the server log has details.", None
    return status, "The request could not be answered.", None


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's protocol, but what it answers itself (a malformed request) gets an OpenAI error body.

    One per connection; `book` counts it against the connection limit.
    """

    __slots__ = ("_book", "_silent")

    def __init__(self, manager: web.Server, *, book: ConnectionBook, **options) -> None:
        super().__init__(manager, **options)
        self._book = book
        self._silent = True  # nothing received yet

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._book.connected(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._book.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._silent:
            self._silent = False
            self._book.spoke(self)
        super().data_received(data)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs it; raises if a response was begun
        status, text, code = _malformed_request_error(exc, status)
        response = web.Response(status=status, body=orjson.dumps(error_payload(status, text, code=code)),
                                content_type="application/json", headers={"Server": SERVER_NAME})
        response.force_close()
        return response


class ConnectionBook:
    """Which connections are open, and which of them have sent nothing yet, oldest first.

    At the limit, a new connection takes the place of the oldest one that has sent nothing (an idle flood
    then never starves a real client); when every connection has sent something, the new one is closed.
    """

    def __init__(self, cap: int | None) -> None:
        self.cap = cap
        self.open: dict[JsonErrorRequestHandler, None] = {}
        self.silent: dict[JsonErrorRequestHandler, None] = {}
        self.evicted = self.refused = 0
        self._last_log = -_LOG_INTERVAL

    def admit(self) -> bool:
        """Whether a new connection may be taken, closing a silent one to make room when at the limit."""
        if self.cap is None or len(self.open) < self.cap:
            return True
        if self.silent:
            oldest = next(iter(self.silent))
            self.closed(oldest)
            oldest.force_close()
            self.evicted += 1
            self._warn()
            return True
        self.refused += 1
        self._warn()
        return False

    def created(self, handler: JsonErrorRequestHandler) -> None:
        # Counted from its creation: several connections accepted in one pass of the loop are all created
        # before the first of them is told it is connected.
        self.open[handler] = None

    def connected(self, handler: JsonErrorRequestHandler) -> None:
        if handler in self.open:  # not closed meanwhile
            self.silent[handler] = None

    def spoke(self, handler: JsonErrorRequestHandler) -> None:
        self.silent.pop(handler, None)

    def closed(self, handler: JsonErrorRequestHandler) -> None:
        self.open.pop(handler, None)
        self.silent.pop(handler, None)

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_INTERVAL:
            self._last_log = now
            logger.warning("at the connection limit (--max-connections %d): %d connections that had sent nothing "
                           "closed and %d new ones refused so far", self.cap, self.evicted, self.refused)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


class LimitedSite(web.BaseSite):
    """A listening socket already bound (the CLI binds it before the model loads) whose connections are
    JsonErrorRequestHandlers, at most `limits.connection_cap()` of them at once."""

    __slots__ = ("_sock", "_name", "_options", "book")

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, limits: ConnectionLimits,
                 access_log: logging.Logger | None, backlog: int = 1024) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock = sock
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"
        self._options = handler_options(limits, access_log)
        self.book = ConnectionBook(limits.connection_cap())

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, sock=self._sock, backlog=self._backlog)

    def _new_connection(self) -> asyncio.Protocol:
        if not self.book.admit():
            return _Refused()
        handler = JsonErrorRequestHandler(self._runner.server, loop=asyncio.get_running_loop(), book=self.book,
                                          **self._options)
        self.book.created(handler)
        return handler
