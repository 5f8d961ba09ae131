"""Clients that hold a connection without doing their part: one that never reads, one that never ends its body."""
from __future__ import annotations

import asyncio
import logging
import socket
from urllib.parse import urlsplit

import orjson
import pytest

from asyncserve.server import openai_app
from tests.server.conftest import MODEL_NAME, LiveServer, make_engine, serve, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

WRITE_TIMEOUT = 0.5


async def _small_send_buffer(request, response) -> None:
    """Shrinks the server side's kernel send buffer, so that a client that never reads blocks writes soon."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def _connect_never_reading(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: a small window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    return sock


async def test_a_client_that_never_reads_its_stream_is_cut_off_and_its_request_aborted(model_path, caplog):
    engine = make_engine(model_path)
    app = openai_app(engine, log_requests=False, stream_write_timeout=WRITE_TIMEOUT)
    app.on_response_prepare.append(_small_send_buffer)
    async with serve(app) as url:
        live = LiveServer(url, app, engine)
        body = orjson.dumps({"model": MODEL_NAME, "prompt": "Talk", "max_tokens": 400, "n": 4, "logprobs": 20,
                             "ignore_eos": True, "stream": True})
        sock = await _connect_never_reading(url)
        request = (b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.WARNING, logger="asyncserve.server"):
            await loop.sock_sendall(sock, request)
            while not engine.llm_engine.requests:  # the request started
                await asyncio.sleep(0.01)
            deadline = loop.time() + 30
            while live.state.active and loop.time() < deadline:
                await asyncio.sleep(0.05)
        try:
            assert not live.state.active, "the handler is still blocked writing to a client that never reads"
            stats = await wait_until_idle(engine, timeout=2.0)
            assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0
            assert not engine.llm_engine.requests
            assert stats["generation_tokens_total"] < 4 * 400  # aborted, not run to the end
            assert "read nothing for 0.5 s; its request was aborted" in caplog.text
        finally:
            sock.close()


async def test_a_request_body_that_never_ends_is_answered_408_and_the_connection_closed(model_path):
    engine = make_engine(model_path)
    app = openai_app(engine, log_requests=False, request_body_timeout=0.5)
    async with serve(app) as url:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n")  # ... and nothing more, ever
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # read() returns at EOF: the server closed
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"Connection: close" in head
    error = orjson.loads(body)["error"]
    assert error["code"] == "request_timeout" and error["type"] == "invalid_request_error"
    assert "0.5 s" in error["message"]


async def test_a_client_that_never_reads_a_big_non_streamed_body_is_cut_off(model_path, caplog):
    engine = make_engine(model_path)
    app = openai_app(engine, log_requests=False, stream_write_timeout=WRITE_TIMEOUT)
    app.on_response_prepare.append(_small_send_buffer)
    async with serve(app) as url:
        body = orjson.dumps({"model": MODEL_NAME, "prompt": list(range(3, 303)), "n": 16, "max_tokens": 1,
                             "echo": True, "logprobs": 20, "temperature": 1.0})  # a body of about 3 MB
        sock = await _connect_never_reading(url)
        loop = asyncio.get_running_loop()
        try:
            with caplog.at_level(logging.WARNING, logger="asyncserve.server"):
                await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                                              b"Content-Type: application/json\r\nContent-Length: "
                                        + str(len(body)).encode() + b"\r\n\r\n" + body)
                deadline = loop.time() + 30
                while "its request was aborted" not in caplog.text and loop.time() < deadline:
                    await asyncio.sleep(0.05)
            assert "read nothing for 0.5 s; its request was aborted" in caplog.text
        finally:
            sock.close()
        stats = await wait_until_idle(engine, timeout=2.0)
        assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0
