"""OpenAI-shaped error bodies: `{"error": {"message", "type", "param", "code"}}`, and what maps to which."""
from __future__ import annotations

import orjson
from aiohttp import web

from asyncserve.errors import (ConfigError, EngineDeadError, InvalidParameterError, QueueFullError)
from asyncserve.config.vllm_compat import route_line

# HTTP status -> OpenAI's error `type`.
_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}
# HTTP status -> default `code` when nothing more precise is known.
_CODES = {
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    500: "internal_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the server refuses, with its HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else _CODES.get(status)
        self.headers = headers


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


def error_payload(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code if code is not None else _CODES.get(status)}}


def error_response(error: ApiError) -> web.Response:
    body = orjson.dumps(error_payload(error.status, error.message, error.param, error.code))
    return web.Response(status=error.status, body=body, content_type="application/json",
                        headers=error.headers)


def api_error_from(exc: BaseException) -> ApiError | None:
    """The ApiError an engine or HTTP exception stands for; None for anything unexpected (a bug: 500)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InvalidParameterError):  # SamplingParamsError, PromptTooLongError
        return ApiError(400, str(exc), exc.param)
    if isinstance(exc, QueueFullError):
        return ApiError(503, str(exc), code="queue_full", headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return ApiError(503, str(exc), code="engine_dead")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc))
    if isinstance(exc, web.HTTPException) and exc.status >= 400:
        return _from_http_exception(exc)
    if isinstance(exc, web.RequestPayloadError):  # a body aiohttp cannot decode (bad Content-Encoding ...)
        return ApiError(400, f"The request body could not be read: {exc.__cause__ or exc}.", code="invalid_body")
    return None


def vllm_route_error(method: str, path: str) -> ApiError | None:
    """A 404 that names the vLLM feature behind a path asyncserve does not serve; None for other paths."""
    line = route_line(method, path)
    return None if line is None else ApiError(404, line, code="not_implemented")


def _from_http_exception(exc: web.HTTPException) -> ApiError:
    headers = {name: value for name, value in exc.headers.items()
               if name.lower() in ("allow", "www-authenticate", "retry-after")}
    if exc.status == 404:
        message = "Not found: no route matches this path."
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        message = f"Method {exc.method} is not allowed here; use {', '.join(sorted(exc.allowed_methods))}."
    elif exc.status == 413:
        message = f"The request body is too large: {exc.text}"
    else:
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
    return ApiError(exc.status, message, headers=headers or None)
