"""OpenAI's batch file format, as `vllm run-batch` reads and writes it: a request per input line, a record per
output line.

In: `{"custom_id": "...", "method": "POST", "url": "/v1/chat/completions", "body": {...}}`.
Out: `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`. Every record has a
response: the server's JSON body, its error body for a refused request (and then `error` is that body's
error object, where vLLM's readers look). A line that cannot be sent gets the same shape, status 400.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson

from asyncserve.server.errors import ApiError, error_payload
from asyncserve.utils.ids import random_hex_id

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


@dataclass
class BatchLine:
    """One input line: what to send, or why it cannot be sent."""

    number: int  # 1-based, as an editor counts lines
    custom_id: str | None = None
    url: str | None = None
    body: bytes | None = None  # the request body, JSON
    error: ApiError | None = None


def _refused(number: int, message: str, param: str | None, code: str, custom_id: str | None = None) -> BatchLine:
    return BatchLine(number, custom_id, error=ApiError(400, f"Line {number}: {message}", param, code))


def parse_line(number: int, text: str | bytes, seen_ids: set[str]) -> BatchLine:
    """The request on one line; a line that breaks the format gets its error here, and never reaches the
    server. A custom_id seen on an earlier line is refused (OpenAI refuses such a file whole)."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        return _refused(number, f"not valid JSON: {exc}.", None, "invalid_json")
    if not isinstance(data, dict):
        return _refused(number, "must be a JSON object with custom_id, method, url and body.", None,
                        "invalid_batch_line")
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return _refused(number, "'custom_id' must be a non-empty string.", "custom_id", "invalid_batch_line")
    if custom_id in seen_ids:
        return _refused(number, f"custom_id {custom_id!r} is used by an earlier line; each line needs its own.",
                        "custom_id", "duplicate_custom_id", custom_id)
    seen_ids.add(custom_id)
    url, body = data.get("url"), data.get("body")
    if data.get("method", "POST") != "POST":
        return _refused(number, f"'method' must be \"POST\", got {data.get('method')!r}.", "method",
                        "invalid_batch_line", custom_id)
    if url not in URLS:
        return _refused(number, f"'url' must be one of {', '.join(URLS)}; got {url!r}.", "url",
                        "invalid_batch_line", custom_id)
    if not isinstance(body, dict):
        return _refused(number, "'body' must be a JSON object: the request as the endpoint takes it.", "body",
                        "invalid_batch_line", custom_id)
    if body.get("stream"):
        return _refused(number, "'stream' is not supported in a batch file: each answer is written whole. "
                                "Remove it or set it to false.", "stream", "invalid_batch_line", custom_id)
    return BatchLine(number, custom_id, url, orjson.dumps(body))


def response_record(custom_id: str | None, status: int, body: dict) -> dict:
    """A line's output record: the server's answer, and its error object when it refused."""
    request_id = body.get("id") if status == 200 and isinstance(body.get("id"), str) else None
    error = None if status == 200 else body.get("error", body)
    return {"id": f"batch_req_{random_hex_id()}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id or f"req_{random_hex_id()}",
                         "body": body},
            "error": error}


def error_record(custom_id: str | None, error: ApiError) -> dict:
    """The record of a line that never reached the server (or whose request failed in transit)."""
    return response_record(custom_id, error.status,
                           error_payload(error.status, error.message, error.param, error.code))
