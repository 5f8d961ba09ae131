"""What raw HTTP can throw at the server: bad encodings, odd bytes in headers, malformed requests, methods."""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest

from tests.server.conftest import MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")

COMPLETION = orjson.dumps({"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 2})


async def raw_exchange(url: str, request: bytes, timeout: float = 10.0) -> tuple[int, dict, bytes]:
    """Sends `request` as bytes on a new connection; returns (status, headers, body) of the answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", 0))), timeout)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


def post(path: str, body: bytes, *extra_headers: bytes) -> bytes:
    headers = b"".join(h + b"\r\n" for h in extra_headers)
    return (b"POST " + path.encode() + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + headers
            + b"\r\n" + body)


def assert_openai_error(body: bytes, code: str | None = None) -> dict:
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    return error


async def test_a_body_that_is_not_what_its_content_encoding_says_is_a_400(server):
    for encoding in (b"gzip", b"deflate"):
        status, _, body = await raw_exchange(server.url, post("/v1/completions", b"this is not compressed",
                                                              b"Content-Encoding: " + encoding))
        assert status == 400, (encoding, body)
        assert "could not be read" in assert_openai_error(body, "invalid_body")["message"]


async def test_a_non_ascii_bearer_token_is_a_401(model_path):
    async with live_server(model_path, app_options={"api_key": "sekret"}) as live:
        for token in (b"\xe9\xe9", b"sekret\xff", "s\u00e9kret".encode()):
            status, headers, body = await raw_exchange(live.url, post("/v1/completions", COMPLETION,
                                                                      b"Authorization: Bearer " + token))
            assert status == 401, (token, body)
            assert_openai_error(body, "invalid_api_key")
            assert headers["www-authenticate"] == "Bearer"
        status, _, _ = await raw_exchange(live.url, post("/v1/completions", COMPLETION,
                                                         b"Authorization: Bearer sekret"))
        assert status == 200


async def test_a_non_ascii_api_key_is_matched_byte_for_byte(model_path):
    async with live_server(model_path, app_options={"api_key": "s\u00e9kret"}) as live:
        status, _, _ = await raw_exchange(live.url, post("/v1/completions", COMPLETION,
                                                         "Authorization: Bearer s\u00e9kret".encode()))
        assert status == 200


async def test_with_an_api_key_a_wrong_method_on_an_api_route_is_401_before_405(model_path):
    async with live_server(model_path, app_options={"api_key": "sekret"}) as live, \
            aiohttp.ClientSession() as http:
        for method, path in (("GET", "/v1/completions"), ("DELETE", "/v1/models"), ("PUT", "/tokenize")):
            async with http.request(method, live.url + path) as response:
                assert response.status == 401, (method, path)
                assert "Allow" not in response.headers
                assert_openai_error(await response.read(), "invalid_api_key")
            async with http.request(method, live.url + path,
                                    headers={"Authorization": "Bearer sekret"}) as response:
                assert response.status == 405 and response.headers["Allow"]
        async with http.post(live.url + "/health") as response:  # open routes stay open
            assert response.status == 405


async def test_the_server_header_names_no_versions(server, http):
    async with http.get(server.url + "/v1/models") as response:
        assert response.headers["Server"] == "asyncserve"
    async with http.post(server.url + "/v1/completions", json={"prompt": 5}) as response:
        assert response.status == 400
        assert response.headers["Server"] == "asyncserve"


async def test_a_malformed_http_request_logs_one_warning_line_without_a_traceback(server, caplog):
    with caplog.at_level(logging.DEBUG, logger="aiohttp"):
        status, _, _ = await raw_exchange(server.url, b"POST /v1/completions HTTP/1.1\r\nHost: test\r\n"
                                                      b"Content-Length: ten\r\n\r\n")
    assert status == 400
    records = [r for r in caplog.records if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING]
    assert len(records) == 1
    record = records[0]
    assert record.levelno == logging.WARNING
    assert record.exc_info is None and record.exc_text is None
    message = record.getMessage()
    assert message.startswith("malformed HTTP request from 127.0.0.1") and "\n" not in message
