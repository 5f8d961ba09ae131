"""The OpenAI-compatible aiohttp application: routes, middlewares, and the engine's lifetime (cleanup_ctx)."""
from __future__ import annotations

import gc
import hmac
import logging

from aiohttp import web

from asyncserve.errors import ConfigError
from asyncserve.multimodal.fetch import FetchLimits
from asyncserve.server import anthropic
from asyncserve.server.chat import create_chat_completion, load_chat_template
from asyncserve.server.parsers_config import check_parsers
from asyncserve.server.connection import quiet_malformed_request_logs, send_and_close, set_server_header
from asyncserve.server.completions import create_completion
from asyncserve.server.embeddings import create_embedding
from asyncserve.server.cors import CorsConfig, cors_middleware, enable_cors
from asyncserve.server.errors import ApiError, api_error_from, error_response, vllm_route_error
from asyncserve.server.image_urls import IMAGE_FETCHER, ImageFetcher, image_fetcher_lifetime
from asyncserve.server.info import detokenize, health, list_models, metrics, retrieve_model, tokenize, version
from asyncserve.server.page import chat_page
from asyncserve.server.responses import add_responses_routes
from asyncserve.server.serving import client_closed
from asyncserve.server.state import SERVER_STATE, ServerState
from asyncserve.server.stall_stacks import StallSampler
from asyncserve.server.lora_adapters import (LoRAAdapters, load_lora_adapter, resolver_dir,
                                             runtime_updating_allowed, unload_lora_adapter)

logger = logging.getLogger("asyncserve.server")

# Routes that answer without an API key, as in vLLM: probes and scrapers carry no credentials; the chat
# page is public too (it asks for the key and sends it with its API calls).
OPEN_ROUTES = frozenset({"health", "version", "metrics", "chat_page"})
OPEN_PATHS = ("/health", "/version", "/metrics", "/")
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every failure leaves as an OpenAI error body (Anthropic's on its Messages routes); only a bug becomes a
    500, and it is logged at ERROR."""
    try:
        return await handler(request)
    except ConnectionResetError:  # the client left while we read or wrote
        return client_closed()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = api_error_from(exc)
        if exc.status == 404 and request.match_info.http_exception is not None:
            error = vllm_route_error(request.method, request.path) or error
    except Exception as exc:
        error = api_error_from(exc)
        if error is None:
            request.app[SERVER_STATE].metrics.num_internal_errors += 1
            logger.exception("unexpected error answering %s %s", request.method, request.path)
            error = ApiError(500, f"Internal server error ({type(exc).__name__}); the server log has details.")
    respond = anthropic.error_response if anthropic.is_messages_request(request) else error_response
    if request.content.is_eof():
        return respond(error)
    # The body was not read to its end (too large, too slow, undecodable): answer, then close, so that
    # aiohttp does not go on reading (and inflating) the rest.
    return await send_and_close(request, respond(error))


def _bearer_token_matches(header: str, api_key: bytes) -> bool:
    scheme, _, token = header.partition(" ")
    # aiohttp keeps undecodable header bytes as surrogates: compare the raw bytes, never fail on them.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                                                              api_key)


def _x_api_key_matches(request: web.Request, api_key: bytes) -> bool:
    """Anthropic's clients send the key as `x-api-key`: accepted on the Messages routes."""
    header = request.headers.get("x-api-key")
    return header is not None and anthropic.is_messages_request(request) and \
        hmac.compare_digest(header.strip().encode("utf-8", "surrogateescape"), api_key)


@web.middleware
async def auth_middleware(request: web.Request, handler):
    """With an API key set, every route but the open ones needs `Authorization: Bearer <key>` (or, on the
    Messages routes, `x-api-key: <key>`); a wrong method on an API route is answered 401 before 405, so that
    nothing about it leaks without the key."""
    api_key = request.app[SERVER_STATE].api_key
    match_info = request.match_info
    if api_key is None:
        return await handler(request)
    exception = match_info.http_exception
    if exception is not None:
        is_open = exception.status != 405 or request.path.endswith(OPEN_PATHS)
    else:
        is_open = match_info.route.name in OPEN_ROUTES
    key = api_key.encode("utf-8", "surrogateescape")
    if not is_open and not _bearer_token_matches(request.headers.get("Authorization", ""), key) and \
            not _x_api_key_matches(request, key):
        also = "'x-api-key: <key>' or " if anthropic.is_messages_request(request) else ""
        raise ApiError(401, f"Missing or incorrect API key: send the header {also}'Authorization: Bearer <key>'.",
                       headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


@web.middleware
async def draining_middleware(request: web.Request, handler):
    """While shutting down, new requests get 503 `shutting_down` (a load balancer retries elsewhere);
    /metrics still answers."""
    state = request.app[SERVER_STATE]
    if state.draining and request.match_info.http_exception is None and \
            request.match_info.route.name != "metrics":
        raise ApiError(503, "The server is shutting down; try another replica.", code="shutting_down",
                       headers={"Connection": "close"})
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
    stalls = StallSampler.from_env()  # ASYNCSERVE_STALL_STACKS=FILE: where the loop stalls, sampled
    if stalls is not None:
        stalls.start()
    yield
    if stalls is not None:
        await stalls.stop()
    await state.lag.stop()
    await state.engine.stop()
    state.close()
    if state.freeze_gc:
        gc.unfreeze()  # lets the interpreter free everything on exit (native extensions check for leaks)


async def _drain(app: web.Application) -> None:
    await app[SERVER_STATE].drain()


def openai_app(engine, *, served_model_name: str | list[str] | None = None, api_key: str | None = None,
               chat_template: str | None = None, log_requests: bool = True,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, drain_timeout: float = 5.0,
               freeze_gc: bool = True, cors: CorsConfig | None = None, stream_write_timeout: float = 30.0,
               request_body_timeout: float = 60.0, tool_call_parser: str | None = None,
               enable_auto_tool_choice: bool = False, reasoning_parser: str | None = None,
               lora_modules: list[dict] | None = None, allow_runtime_lora_updating: bool | None = None,
               lora_dir: str | None = None, health_stall_timeout: float = 120.0,
               return_tokens_as_token_ids: bool = False, image_fetch: FetchLimits | None = None) -> web.Application:
    """An aiohttp app serving `engine` with OpenAI's API; mount it anywhere with `add_subapp`.

    The engine starts and stops with the app. On shutdown, in-flight requests get `drain_timeout`
    seconds to finish, then are aborted (streams end with finish_reason "abort" and `[DONE]`).
    Request bodies over `max_body_bytes` get 413, whether the app runs alone or mounted.
    `freeze_gc` moves everything alive at start-up out of the garbage collector's reach (`gc.freeze()`),
    which removes 100-200 ms full-collection pauses of the loop under load.
    `cors` turns CORS on (vLLM's --allowed-origins ...); without it no CORS header is ever sent.
    A client that reads nothing of its response for `stream_write_timeout` seconds is disconnected and its
    request aborted; a body that has not arrived after `request_body_timeout` seconds is answered 408.
    `tool_call_parser`, `enable_auto_tool_choice` and `reasoning_parser` are vLLM's flags of the same names.
    `lora_modules` (the engine built with enable_lora): adapters served by name, [{"name", "path"}, ...] as
    vLLM's --lora-modules; `allow_runtime_lora_updating` (default: vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)
    opens /v1/load_lora_adapter and /v1/unload_lora_adapter; `lora_dir` (default: vLLM's
    VLLM_LORA_RESOLVER_CACHE_DIR) serves a request whose model names an adapter folder there.
    `/health` answers 503 once the engine has had work but finished no step for `health_stall_timeout` s.
    `return_tokens_as_token_ids` (vLLM's --return-tokens-as-token-ids): logprobs name tokens "token_id:<id>"
    unless a request's field of that name says otherwise.
    `image_fetch`: the bounds on downloading http(s) image URLs (default: vLLM's VLLM_IMAGE_FETCH_TIMEOUT and
    VLLM_MEDIA_URL_ALLOW_REDIRECTS from the environment, the engine's allowed_media_domains).
    """
    check_parsers(tool_call_parser, enable_auto_tool_choice, reasoning_parser)
    names = served_model_name or engine.served_model_names
    state = ServerState(engine=engine, model_names=[names] if isinstance(names, str) else list(names),
                        chat_template=load_chat_template(chat_template), api_key=api_key or None,
                        log_requests=log_requests, drain_timeout=drain_timeout, max_body_bytes=max_body_bytes,
                        freeze_gc=freeze_gc, stream_write_timeout=stream_write_timeout,
                        request_body_timeout=request_body_timeout, tool_call_parser=tool_call_parser,
                        enable_auto_tool_choice=enable_auto_tool_choice, reasoning_parser=reasoning_parser,
                        lora=_lora_adapters(engine, lora_modules, allow_runtime_lora_updating, lora_dir),
                        health_stall_timeout=health_stall_timeout,
                        return_tokens_as_token_ids=return_tokens_as_token_ids)
    middlewares = [error_middleware, auth_middleware, draining_middleware]
    if cors is not None:
        middlewares.insert(0, cors_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    app[SERVER_STATE] = state
    limits = image_fetch or FetchLimits.from_env(engine.config.model.allowed_media_domains)
    app[IMAGE_FETCHER] = ImageFetcher(limits)
    if cors is not None:
        enable_cors(app, cors)
    app.on_response_prepare.append(set_server_header)
    quiet_malformed_request_logs()
    app.cleanup_ctx.append(_engine_lifetime)
    app.cleanup_ctx.append(image_fetcher_lifetime)
    app.on_shutdown.append(_drain)
    app.router.add_post("/v1/completions", create_completion, name="completions")
    app.router.add_post("/v1/chat/completions", create_chat_completion, name="chat_completions")
    app.router.add_post("/v1/embeddings", create_embedding, name="embeddings")
    app.router.add_post("/v1/messages", anthropic.create_message, name="messages")
    app.router.add_post("/v1/messages/count_tokens", anthropic.count_tokens, name="messages_count_tokens")
    app.router.add_get("/v1/models", list_models, name="models")
    app.router.add_get("/v1/models/{model:.+}", retrieve_model, name="model")
    app.router.add_post("/tokenize", tokenize, name="tokenize")
    app.router.add_post("/detokenize", detokenize, name="detokenize")
    app.router.add_get("/health", health, name="health")
    app.router.add_get("/version", version, name="version")
    app.router.add_get("/metrics", metrics, name="metrics")
    app.router.add_get("/", chat_page, name="chat_page")
    app.router.add_post("/v1/load_lora_adapter", load_lora_adapter, name="load_lora_adapter")
    app.router.add_post("/v1/unload_lora_adapter", unload_lora_adapter, name="unload_lora_adapter")
    add_responses_routes(app)
    return app


def _lora_adapters(engine, modules: list[dict] | None, allow_runtime_updating: bool | None, lora_dir: str | None):
    if engine.llm_engine.lora is None:
        if modules or lora_dir:
            raise ConfigError("--lora-modules and --lora-dir need the engine built with --enable-lora "
                              "(enable_lora=True).")
        return None
    allowed = runtime_updating_allowed() if allow_runtime_updating is None else allow_runtime_updating
    return LoRAAdapters(modules, allowed, resolver_dir(lora_dir))

