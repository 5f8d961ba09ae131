"""Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`, for the Messages routes only:
the same ApiError the OpenAI routes raise, written the way the `anthropic` client reads it."""
from __future__ import annotations

import orjson
from aiohttp import web

from asyncserve.server.errors import ApiError

MESSAGES_PATH = "/v1/messages"
# Anthropic's status for "overloaded, retry later": its clients back off and retry on it.
OVERLOADED = 529
# Our 503s that mean "try again, or elsewhere" (the others, such as a dead engine, stay 503 api_error).
_OVERLOADED_CODES = frozenset({"queue_full", "shutting_down"})
_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "request_too_large", 429: "rate_limit_error", OVERLOADED: "overloaded_error"}


ROUTE_NAMES = frozenset({"messages", "messages_count_tokens"})


def is_messages_request(request: web.Request) -> bool:
    """A request to a Messages route, or to a path below /v1/messages that has none (its 404 and 405 are
    Anthropic's too); the app may be mounted under a prefix."""
    if request.match_info.http_exception is None:
        return request.match_info.route.name in ROUTE_NAMES
    path = request.path
    return path.endswith(MESSAGES_PATH) or MESSAGES_PATH + "/" in path


def status_and_type(error: ApiError) -> tuple[int, str]:
    status = error.status
    if status == 503 and error.code in _OVERLOADED_CODES:
        status = OVERLOADED
    if status >= 500:
        return status, _TYPES.get(status, "api_error")
    return status, _TYPES.get(status, "invalid_request_error")


def error_body(error: ApiError) -> dict:
    _, kind = status_and_type(error)
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def error_response(error: ApiError) -> web.Response:
    status, _ = status_and_type(error)
    return web.Response(status=status, body=orjson.dumps(error_body(error)), content_type="application/json",
                        headers=error.headers)


def error_event(error: ApiError) -> bytes:
    """A failure after a stream's headers went out: Anthropic's `error` event, which its client raises."""
    return b"event: error\ndata: " + orjson.dumps(error_body(error)) + b"\n\n"
