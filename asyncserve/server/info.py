"""The small endpoints: models, health, version, metrics, tokenize, detokenize."""
from __future__ import annotations

from aiohttp import web

import asyncserve
from asyncserve.server.chat import render
from asyncserve.server.errors import ApiError, bad_request
from asyncserve.server.metrics import CONTENT_TYPE
from asyncserve.server.protocol import Fields, parse_chat
from asyncserve.server.serving import json_response, read_and_prepare
from asyncserve.server.state import SERVER_STATE, ServerState


def _model_card(state: ServerState, name: str) -> dict:
    engine = state.engine
    return {"id": name, "object": "model", "created": state.created, "owned_by": "asyncserve",
            "root": engine.model_path, "parent": None, "max_model_len": engine.max_model_len}


def _adapter_card(state: ServerState, lora) -> dict:
    """A LoRA adapter as vLLM lists it: its own id, the base model as parent, its folder as root."""
    return {"id": lora.lora_name, "object": "model", "created": state.created, "owned_by": "asyncserve",
            "root": lora.lora_path, "parent": lora.base_model_name or state.model_names[0],
            "max_model_len": state.engine.max_model_len}


async def list_models(request: web.Request) -> web.Response:
    state = request.app[SERVER_STATE]
    cards = [_model_card(state, name) for name in state.model_names]
    if state.lora is not None:
        cards += [_adapter_card(state, lora) for lora in state.lora.by_name.values()]
    return json_response({"object": "list", "data": cards})


async def retrieve_model(request: web.Request) -> web.Response:
    state = request.app[SERVER_STATE]
    name = state.resolve_model(request.match_info["model"])
    lora = state.lora_request(name)
    return json_response(_adapter_card(state, lora) if lora is not None else _model_card(state, name))


async def health(request: web.Request) -> web.Response:
    """200 while the engine runs; 503 once it died or stopped (a load balancer takes the replica out)."""
    state = request.app[SERVER_STATE]
    engine = state.engine
    engine.check_health()
    if not engine.is_running:
        raise ApiError(503, "The engine is not running.", code="engine_not_running")
    stalled = engine.seconds_without_progress()
    if stalled > state.health_stall_timeout:  # vLLM's /health stays 200 while its engine hangs
        raise ApiError(503, f"The engine has had work but finished no step for {stalled:.0f} s.",
                       code="engine_stalled")
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return json_response({"version": asyncserve.__version__})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[SERVER_STATE]
    extra = [
        ("event_loop_lag_seconds_max", "gauge", "Worst event-loop lag seen since start-up.", state.lag.max_lag),
        ("num_http_requests_active", "gauge", "Generation requests being answered.", len(state.active)),
        ("engine_healthy", "gauge", "1 while the engine runs, 0 after it died or stopped.",
         int(state.engine.is_running)),
    ]
    text = state.metrics.render(state.engine.stats(), extra, {"model_name": state.model_names[0]},
                                [state.lag.histogram], _cache_info(state.engine))
    return web.Response(text=text, headers={"Content-Type": CONTENT_TYPE})


def _cache_info(engine) -> dict:
    """vLLM's `vllm:cache_config_info` labels, from the resolved config."""
    config = engine.config
    cache = config.cache
    return {"block_size": cache.block_size, "cache_dtype": cache.kv_cache_dtype,
            "enable_prefix_caching": cache.enable_prefix_caching,
            "gpu_memory_utilization": cache.gpu_memory_utilization,
            "num_gpu_blocks": engine.llm_engine.block_pool.num_blocks, "swap_space": cache.swap_space}


def _tokenize(state: ServerState, data) -> dict:
    fields = Fields(data)
    state.resolve_model(fields.string("model"))
    engine = state.engine
    if "messages" in data:
        parsed = parse_chat(data, vocab_size=engine.vocab_size, auto_tools=True)  # tools only render here
        token_ids = render(state, parsed).token_ids
    else:
        prompt = fields.string("prompt")
        if prompt is None:
            raise bad_request("'prompt' (a string) or 'messages' is required.", "prompt")
        token_ids = state.prompt_encoder.encode(prompt, fields.boolean("add_special_tokens", True), "prompt")
    body = {"count": len(token_ids), "max_model_len": engine.max_model_len, "tokens": token_ids}
    if fields.boolean("return_token_strs", False):
        body["token_strs"] = state.tokenizer.convert_ids_to_tokens(token_ids)
    return body


async def tokenize(request: web.Request) -> web.Response:
    """`{"prompt": str, "add_special_tokens": true}` or `{"messages": [...]}` -> token ids.

    As in vLLM, a prompt of max_model_len tokens or more is refused (400): no request could use it.
    """
    state = request.app[SERVER_STATE]
    return json_response(await read_and_prepare(request, state, _tokenize, image_urls=True))


def _detokenize(state: ServerState, data) -> dict:
    fields = Fields(data)
    state.resolve_model(fields.string("model"))
    tokens = data.get("tokens")
    vocab_size, max_len = state.engine.vocab_size, state.engine.max_model_len
    if isinstance(tokens, list) and len(tokens) > max_len:
        raise bad_request(f"'tokens' has {len(tokens)} ids; no sequence of this model is longer than "
                          f"max_model_len={max_len}.", "tokens")
    if not isinstance(tokens, list) or not all(type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise bad_request(f"'tokens' must be an array of token ids in [0, {vocab_size}).", "tokens")
    return {"prompt": state.tokenizer.decode(tokens)}


async def detokenize(request: web.Request) -> web.Response:
    """`{"tokens": [ids]}` -> `{"prompt": text}`; at most max_model_len ids."""
    state = request.app[SERVER_STATE]
    return json_response(await read_and_prepare(request, state, _detokenize))
