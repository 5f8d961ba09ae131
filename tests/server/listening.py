"""The CLI's own serving loop (`asyncserve.server.run.serve`, connection limits included) in the tests' event
loop, and raw-socket helpers for what a client library would never send."""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from asyncserve.server import openai_app
from asyncserve.server.listener import ConnectionLimits
from asyncserve.server.run import serve

from tests.server.conftest import make_engine

LIVENESS_TIMEOUT = 10.0  # seconds: "it happens", never "it happens fast"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@contextlib.asynccontextmanager
async def cli_server(model_path: str, limits: ConnectionLimits | None = None, **app_options):
    """(host, port) of `serve()` on 127.0.0.1, as the CLI runs it (default limits unless given), until the
    block ends."""
    app = openai_app(make_engine(model_path), log_requests=False, **app_options)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    options = {} if limits is None else {"limits": limits}
    task = asyncio.ensure_future(serve(app, "127.0.0.1", 0, stop=stop, on_started=started.set_result, **options))
    try:
        host, port = (await asyncio.wait_for(started, 60))[0][:2]
        yield host, port
    finally:
        stop.set()
        await task


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One response (with a Content-Length)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), LIVENESS_TIMEOUT)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), LIVENESS_TIMEOUT)
    return Answer(int(lines[0].split()[1]), headers, body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Waits for the server to close the connection; True once it has sent nothing more before closing."""
    return await asyncio.wait_for(reader.read(), LIVENESS_TIMEOUT) == b""


def get(path: str = "/v1/models") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: test\r\n\r\n"
