"""Malformed HTTP gets an OpenAI-shaped JSON error from the CLI server, as every other refusal does, and the
connection is closed after it. (aiohttp's parser refuses these before any app code runs; its own answer is
plain text.)"""
from __future__ import annotations

import asyncio

import orjson
import pytest
import pytest_asyncio

from tests.server.listening import cli_server, closed_by_server, read_answer

pytestmark = pytest.mark.asyncio(loop_scope="session")

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"

# name -> (raw request, status, code)
MALFORMED = {
    "content-length-not-a-number": (HEAD + b"Content-Length: ten\r\n\r\n", 400, "malformed_http"),
    "content-length-negative": (HEAD + b"Content-Length: -1\r\n\r\n{}", 400, "malformed_http"),
    "content-length-twice": (HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "malformed_http"),
    "content-length-and-chunked": (HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                                   b"2\r\n{}\r\n0\r\n\r\n", 400, "malformed_http"),
    "chunked-not-last": (HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400, "malformed_http"),
    "unknown-transfer-encoding": (HEAD + b"Transfer-Encoding: bogus\r\n\r\n", 400, "malformed_http"),
    "chunk-size-not-hex": (CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n", 400, "malformed_http"),
    "chunk-size-overflow": (CHUNKED + b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n", 400, "malformed_http"),
    "chunk-without-crlf": (CHUNKED + b"2\r\n{}XX0\r\n\r\n", 400, "malformed_http"),
    "bare-lf-line-endings": (b"POST /v1/completions HTTP/1.1\nHost: test\nContent-Length: 2\n\n{}", 400,
                             "malformed_http"),
    "9-kb-header": (b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431,
                    "header_fields_too_large"),
    "200-headers": (b"GET /v1/models HTTP/1.1\r\nHost: test\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
                    + b"\r\n", 431, "header_fields_too_large"),
    "100-kb-request-line": (b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: test\r\n\r\n", 414, "uri_too_long"),
    "nul-in-a-header": (b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-A: a\x00b\r\n\r\n", 400, "malformed_http"),
    "space-before-colon": (b"GET /v1/models HTTP/1.1\r\nHost : test\r\n\r\n", 400, "malformed_http"),
    "obsolete-line-folding": (b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-A: a\r\n b\r\n\r\n", 400, "malformed_http"),
    "bad-http-version": (b"GET /v1/models HTTP/9.x\r\nHost: test\r\n\r\n", 400, "malformed_http"),
}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def address(model_path):
    async with cli_server(model_path) as host_port:
        yield host_port


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_http_gets_an_openai_error_and_the_connection_closed(address, name):
    request, status, code = MALFORMED[name]
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(request)
        answer = await read_answer(reader)
        closed = await closed_by_server(reader)
    finally:
        writer.close()
    assert answer.status == status, answer.body
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["server"] == "asyncserve"
    error = orjson.loads(answer.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, code)
    assert "\n" not in error["message"] and len(error["message"]) < 200
    assert closed


async def test_a_request_line_just_under_the_limit_is_served(address):
    reader, writer = await asyncio.open_connection(*address)
    path = b"/v1/models?" + b"a" * (16_000 - len(b"GET /v1/models? HTTP/1.1"))
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    answer = await read_answer(reader)
    writer.close()
    assert answer.status == 200
