"""POST /v1/embeddings (OpenAI's shape, vLLM's extras) for a model served as an embedding model; and the
refusals both ways: embeddings from a generative model, completions from an embedding model."""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass

import orjson
from aiohttp import web

from asyncserve.errors import RequestAbortedError
from asyncserve.pooling_params import PoolingParams
from asyncserve.server.errors import ApiError, bad_request
from asyncserve.server.protocol import Fields, _kind
from asyncserve.server.serving import read_and_prepare
from asyncserve.server.state import SERVER_STATE, ServerState

logger = logging.getLogger("asyncserve.server")

EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user",
                              "truncate_prompt_tokens", "add_special_tokens", "normalize"})
ENCODING_FORMATS = ("float", "base64")


def refuse_on_embedding_model(state: ServerState, api: str) -> None:
    """Completions and chat completions are refused (400) when the model runs as an embedding model."""
    if state.engine.is_pooling_model:
        raise bad_request(f"The model '{state.model_names[0]}' does not support the {api} API: this server "
                          "runs it as an embedding model (runner 'pooling'). Use /v1/embeddings, or start the "
                          "server with --runner generate.", "model")


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[tuple[str | None, list[int]]]  # (text or None, token ids) per input
    params: PoolingParams
    encoding_format: str


def _inputs(value) -> list[str | list[int]]:
    """OpenAI's `input`: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise bad_request(f"'input' must be a string, an array of strings, an array of token ids or an array "
                          f"of token-id arrays, got {_kind(value)}.", "input")
    elif value and all(type(item) is int for item in value):
        value = [value]
    if not value:
        raise bad_request("'input' must not be empty: give at least one string or token id.", "input")
    for item in value:
        if isinstance(item, str):
            if not item:
                raise bad_request("'input' must not contain empty strings.", "input")
        elif not isinstance(item, list) or not item or not all(type(t) is int for t in item):
            raise bad_request("Each item of 'input' must be a non-empty string or a non-empty array of token "
                              f"ids (integers), got {_kind(item)}{' (empty)' if item == [] else ''}.", "input")
    return value


def _prepare(state: ServerState, data) -> EmbeddingRequest:
    fields = Fields(data)
    model = state.resolve_model(fields.string("model"))
    engine = state.engine
    if not engine.is_pooling_model:
        raise bad_request(f"The model '{model}' does not support the Embeddings API: this server runs it as a "
                          "generative model. Serve an embedding model (--runner pooling, or --task embed) "
                          "for /v1/embeddings.", "model")
    ignored = sorted(name for name in data if name not in EMBEDDING_FIELDS)
    if ignored:
        logger.warning("The following fields were present in the request but ignored: %s", ignored)
    fields.string("user")
    encoding_format = fields.string("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise bad_request(f"'encoding_format' must be 'float' or 'base64', got {encoding_format!r}.",
                          "encoding_format")
    params = PoolingParams(dimensions=fields.integer("dimensions"), normalize=fields.boolean("normalize", None),
                           truncate_prompt_tokens=fields.integer("truncate_prompt_tokens"))
    add_special_tokens = fields.boolean("add_special_tokens", True)
    inputs = []
    for item in _inputs(fields.raw("input")):
        if isinstance(item, str):
            if state.tokenizer is None:
                raise bad_request("This server runs without a tokenizer: send token ids as 'input'.", "input")
            text, token_ids = item, state.tokenizer.encode(item, add_special_tokens=add_special_tokens)
        else:
            text, token_ids = None, item
        truncated = params.truncate_prompt(token_ids, engine.max_model_len)
        text, token_ids = (text, token_ids) if len(truncated) == len(token_ids) else (None, truncated)
        engine.validate(token_ids, params)  # empty, vocabulary, max_model_len, dimensions
        inputs.append((text, token_ids))
    return EmbeddingRequest(model, inputs, params, encoding_format)


class _Embeddings:
    """The engine requests of one HTTP request: a graceful shutdown aborts what is left of them."""

    def __init__(self, engine, base_id: str, parsed: EmbeddingRequest):
        self.request_ids = [f"{base_id}-{index}" for index in range(len(parsed.inputs))]
        self.engine = engine
        self.tasks = [asyncio.ensure_future(engine.embed({"prompt": text, "prompt_token_ids": token_ids},
                                                         parsed.params, request_id))
                      for (text, token_ids), request_id in zip(parsed.inputs, self.request_ids)]

    async def results(self):
        try:
            return await asyncio.gather(*self.tasks)
        finally:
            for task in self.tasks:
                task.cancel()  # after a failure or a disconnect: a task not done aborts its request

    def abort(self) -> None:
        """A graceful shutdown's deadline passed: the unfinished requests end, the client gets a 503."""
        for request_id in self.request_ids:
            self.engine.abort(request_id)


def _encode(vector, encoding_format: str):
    array = vector.numpy()
    if encoding_format == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(array.astype("<f4").tobytes()).decode("ascii")
    return array


async def create_embedding(request: web.Request) -> web.Response:
    state = request.app[SERVER_STATE]
    state.check_accepting()
    parsed = await read_and_prepare(request, state, _prepare)
    response_id, created = state.new_id("embd"), int(time.time())
    batch = _Embeddings(state.engine, response_id, parsed)
    state.track(batch)
    try:
        outputs = await batch.results()
    except RequestAbortedError:
        raise ApiError(503, "The request was aborted: the server is shutting down.", code="shutting_down") from None
    finally:
        state.untrack(batch)
    num_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    body = {"id": response_id, "object": "list", "created": created, "model": parsed.model,
            "data": [{"object": "embedding", "index": index,
                      "embedding": _encode(output.outputs.data, parsed.encoding_format)}
                     for index, output in enumerate(outputs)],
            "usage": {"prompt_tokens": num_tokens, "total_tokens": num_tokens}}
    if state.log_requests:
        logger.info("embeddings %s: %d inputs, %d tokens", response_id, len(outputs), num_tokens)
    return web.Response(body=orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY),
                        content_type="application/json")
