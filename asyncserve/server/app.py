"""The OpenAI-compatible aiohttp application: routes, middlewares, and the engine's lifetime (cleanup_ctx)."""
from __future__ import annotations

import gc
import hmac
import logging

from aiohttp import web

from asyncserve.server.chat import create_chat_completion, load_chat_template
from asyncserve.server.completions import create_completion
from asyncserve.server.cors import CorsConfig, cors_middleware, enable_cors
from asyncserve.server.errors import ApiError, api_error_from, error_response
from asyncserve.server.info import detokenize, health, list_models, metrics, retrieve_model, tokenize, version
from asyncserve.server.page import chat_page
from asyncserve.server.serving import client_closed
from asyncserve.server.state import SERVER_STATE, ServerState

logger = logging.getLogger("asyncserve.server")

# Routes that answer without an API key, as in vLLM: probes and scrapers carry no credentials; the chat
# page is public too (it asks for the key and sends it with its API calls).
OPEN_ROUTES = frozenset({"health", "version", "metrics", "chat_page"})
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure leaves as an OpenAI error body; only a bug becomes a 500, and it is logged."""
    try:
        return await handler(request)
    except ConnectionResetError:  # the client left while we read or wrote
        return client_closed()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(api_error_from(exc))
    except Exception as exc:
        error = api_error_from(exc)
        if error is None:
            request.app[SERVER_STATE].metrics.num_internal_errors += 1
            logger.exception("unexpected error answering %s %s", request.method, request.path)
            error = ApiError(500, f"Internal server error ({type(exc).__name__}); the server log has details.")
        return error_response(error)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """With an API key set, every route but the open ones needs `Authorization: Bearer <key>`."""
    api_key = request.app[SERVER_STATE].api_key
    match_info = request.match_info
    if api_key is None or match_info.http_exception is not None or match_info.route.name in OPEN_ROUTES:
        return await handler(request)
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "Missing or incorrect API key: send the header 'Authorization: Bearer <key>'.",
                       headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


async def _engine_lifetime(app: web.Application):
    """Starts the engine and the lag monitor with the app; stops them (aborting leftovers) after it."""
    state = app[SERVER_STATE]
    await state.engine.start()
    if state.freeze_gc:
        # The model, tokenizer and libraries are hundreds of thousands of long-lived objects: a full
        # collection walking them stalls the loop for 100-200 ms. Frozen, they are never walked again.
        gc.collect()
        gc.freeze()
    state.lag.start()
    yield
    await state.lag.stop()
    await state.engine.stop()
    if state.freeze_gc:
        gc.unfreeze()  # lets the interpreter free everything on exit (native extensions check for leaks)


async def _drain(app: web.Application) -> None:
    await app[SERVER_STATE].drain()


def openai_app(engine, *, served_model_name: str | list[str] | None = None, api_key: str | None = None,
               chat_template: str | None = None, log_requests: bool = True,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout: float = 5.0,
               freeze_gc: bool = True, cors: CorsConfig | None = None) -> web.Application:
    """An aiohttp app serving `engine` with OpenAI's API; mount it anywhere with `add_subapp`.

    The engine starts and stops with the app. On shutdown, in-flight requests get `drain_timeout`
    seconds to finish, then are aborted (streams end with finish_reason "abort" and `[DONE]`).
    Request bodies over `max_body_bytes` get 413, whether the app runs alone or mounted.
    `freeze_gc` moves everything alive at start-up out of the garbage collector's reach (`gc.freeze()`),
    which removes 100-200 ms full-collection pauses of the loop under load.
    `cors` turns CORS on (vLLM's --allowed-origins ...); without it no CORS header is ever sent.
    """
    names = served_model_name or engine.served_model_names
    state = ServerState(engine=engine, model_names=[names] if isinstance(names, str) else list(names),
                        chat_template=load_chat_template(chat_template), api_key=api_key or None,
                        log_requests=log_requests, drain_timeout=drain_timeout, max_body_bytes=max_body_bytes,
                        freeze_gc=freeze_gc)
    middlewares = [error_middleware, auth_middleware]
    if cors is not None:
        middlewares.insert(0, cors_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[SERVER_STATE] = state
    if cors is not None:
        enable_cors(app, cors)
    app.cleanup_ctx.append(_engine_lifetime)
    app.on_shutdown.append(_drain)
    app.router.add_post("/v1/completions", create_completion, name="completions")
    app.router.add_post("/v1/chat/completions", create_chat_completion, name="chat_completions")
    app.router.add_get("/v1/models", list_models, name="models")
    app.router.add_get("/v1/models/{model:.+}", retrieve_model, name="model")
    app.router.add_post("/tokenize", tokenize, name="tokenize")
    app.router.add_post("/detokenize", detokenize, name="detokenize")
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/version", version, name="version")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/", chat_page, name="chat_page")
    return app

