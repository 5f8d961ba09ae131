"""CORS, only when asked for (`--allowed-origins`): preflights answered here, headers on every response.

The rules follow Starlette's CORSMiddleware, which vLLM uses, so browser apps behave the same against both.
Headers go on in `on_response_prepare`, so streamed (SSE) and error responses carry them too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import hdrs, web

from asyncserve.errors import ConfigError

_PREFLIGHT_MAX_AGE = "600"
_ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


@dataclass(frozen=True)
class CorsConfig:
    allowed_origins: list[str]
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False

    def __post_init__(self) -> None:
        # Starlette (and so vLLM) would echo any origin back, 'null' of sandboxed pages included: every site
        # could then read answers with the user's cookies. Browsers refuse '*' with credentials; so do we.
        if "*" in self.allowed_origins and self.allow_credentials:
            raise ConfigError("--allowed-origins '[\"*\"]' cannot go with --allow-credentials: any web site could "
                              "then make requests with the user's credentials and read the answers. List the "
                              "origins that may (e.g. '[\"https://app.example\"]'), or drop --allow-credentials.")

    def allows_origin(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins

    def allows_method(self, method: str) -> bool:
        return "*" in self.allowed_methods or method.upper() in (m.upper() for m in self.allowed_methods)

    def disallowed_headers(self, requested: str) -> list[str]:
        if "*" in self.allowed_headers:
            return []
        allowed = {h.lower() for h in self.allowed_headers}
        return [h.strip() for h in requested.split(",") if h.strip() and h.strip().lower() not in allowed]

    def origin_header(self, origin: str) -> str:
        """'*' where any origin may read (never with credentials); otherwise the origin itself (and Vary)."""
        return "*" if "*" in self.allowed_origins else origin


CORS_CONFIG = web.AppKey("cors_config", CorsConfig)


def _is_preflight(request: web.Request) -> bool:
    return (request.method == hdrs.METH_OPTIONS and hdrs.ORIGIN in request.headers
            and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers)


def _preflight(config: CorsConfig, request: web.Request) -> web.Response:
    origin = request.headers[hdrs.ORIGIN]
    method = request.headers[hdrs.ACCESS_CONTROL_REQUEST_METHOD]
    requested_headers = request.headers.get(hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "")
    problems = []
    if not config.allows_origin(origin):
        problems.append("origin")
    if not config.allows_method(method):
        problems.append("method")
    if config.disallowed_headers(requested_headers):
        problems.append("headers")
    methods = _ALL_METHODS if "*" in config.allowed_methods else config.allowed_methods
    headers = {hdrs.ACCESS_CONTROL_ALLOW_METHODS: ", ".join(methods),
               hdrs.ACCESS_CONTROL_MAX_AGE: _PREFLIGHT_MAX_AGE}
    if "*" in config.allowed_headers:
        if requested_headers:
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = requested_headers
    else:
        headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ", ".join(config.allowed_headers)
    if problems:
        return web.Response(status=400, text="Disallowed CORS " + ", ".join(problems), headers=headers)
    headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = config.origin_header(origin)
    if headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] != "*":
        headers[hdrs.VARY] = "Origin"
    if config.allow_credentials:
        headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"
    return web.Response(status=200, text="OK", headers=headers)


@web.middleware
async def cors_middleware(request: web.Request, handler):
    """Answers preflights before routing and authentication (browsers send them without credentials)."""
    config = request.app.get(CORS_CONFIG)
    if config is not None and _is_preflight(request):
        return _preflight(config, request)
    return await handler(request)


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: an allowed origin may read any answer, streams and errors included."""
    config = request.app.get(CORS_CONFIG)
    origin = request.headers.get(hdrs.ORIGIN)
    if config is None or origin is None or not config.allows_origin(origin):
        return
    if hdrs.ACCESS_CONTROL_ALLOW_ORIGIN in response.headers:  # a preflight answer, already complete
        return
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = config.origin_header(origin)
    if response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] != "*":
        response.headers.add(hdrs.VARY, "Origin")
    if config.allow_credentials:
        response.headers[hdrs.ACCESS_CONTROL_ALLOW_CREDENTIALS] = "true"


def enable_cors(app: web.Application, config: CorsConfig) -> None:
    app[CORS_CONFIG] = config
    app.on_response_prepare.append(add_cors_headers)
