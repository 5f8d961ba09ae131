"""What one request may write to the log: a bounded line, however many unknown fields it brings."""
from __future__ import annotations

import logging

import orjson
import pytest

from tests.server.conftest import MODEL_NAME
from tests.server.test_http_edges import raw_exchange

pytestmark = pytest.mark.asyncio(loop_scope="session")

IGNORED = "The following fields were present in the request but ignored: "


async def _warnings_for(server, http, caplog, body: dict) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="asyncserve.server"):
        async with http.post(server.api + "/completions", data=orjson.dumps(body),
                             headers={"Content-Type": "application/json"}) as response:
            assert response.status == 200, await response.text()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(IGNORED)]


async def test_a_hundred_thousand_unknown_fields_are_logged_as_ten_names_and_a_count(server, http, caplog):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1}
    body.update({f"unknown_{i:06d}": i for i in range(100_000)})
    messages = await _warnings_for(server, http, caplog, body)
    assert messages == [IGNORED + str([f"unknown_{i:06d}" for i in range(10)]) + " and 99990 more"]


async def test_a_long_unknown_field_name_is_cut_short_in_the_log(server, http, caplog):
    name = "x" * 1_000_000
    messages = await _warnings_for(server, http, caplog, {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 1,
                                                          name: 1})
    assert messages == [IGNORED + str(["x" * 64 + "..."])]


async def test_a_malformed_request_is_logged_without_the_bytes_it_brought(server, caplog):
    with caplog.at_level(logging.WARNING, logger="aiohttp"):
        for request in (b"GET /v1/models HTTP/1.1\r\nHost: test\r\nX-A: " + b"a" * 8000 + b"\x00\r\n\r\n",
                        b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Length: " + b"9" * 8000 + b"\r\n\r\n"):
            status, _, _ = await raw_exchange(server.url, request)
            assert status == 400
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("aiohttp")]
    assert messages == ["malformed HTTP request from 127.0.0.1: Invalid header value char",
                        "malformed HTTP request from 127.0.0.1: Content-Length overflow"]
