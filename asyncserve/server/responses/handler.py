"""POST /v1/responses, and GET, cancel and DELETE of a response by id. A Responses request is converted into
the chat request the chat path serves (request.py, input_items.py), generated like a chat completion, and
its text becomes output items (output_items.py): whole, or as stream events (stream_events.py)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from aiohttp import web

from asyncserve.errors import InvalidParameterError, LoRAAdapterError
from asyncserve.server.chat import (
    apply_reasoning_parser,
    apply_tool_choice,
    choice_parsers,
    render,
)
from asyncserve.server.chat_output import ChoiceParser
from asyncserve.server.embeddings import refuse_on_embedding_model
from asyncserve.server.errors import ApiError, api_error_from, bad_request
from asyncserve.server.generation import Generation, Prompt, check_prompt, truncate
from asyncserve.server.protocol import ChatRequest, parse_chat
from asyncserve.server.responses.input_items import chat_messages
from asyncserve.server.responses.output_items import OutputItems
from asyncserve.server.responses.request import (
    ResponsesRequest,
    in_responses_terms,
    parse_responses,
)
from asyncserve.server.responses.response_object import ResponseRun, usage
from asyncserve.server.responses.store import ResponseStore, Running, StoredResponse
from asyncserve.server.responses.stream_events import ResponseStreamWriter
from asyncserve.server.serving import (
    client_closed,
    collect,
    json_response,
    log_request,
    read_and_prepare,
    send_json,
    stream,
    stream_sink,
)
from asyncserve.server.state import SERVER_STATE, ServerState
from asyncserve.server.structured import compile_structured_outputs

RESPONSE_STORE = web.AppKey("asyncserve_response_store", ResponseStore)
CANCEL_WAIT_SECONDS = 5.0  # how long a cancel waits for the response's last step to hand back its output


@dataclass
class _Prepared:
    request: ResponsesRequest
    model: str
    parsed: ChatRequest
    prompt: Prompt
    conversation: list[dict]  # the earlier turns' items, then this request's input
    make_parser: Callable[[], ChoiceParser] | None


def _prepare(state: ServerState, store: ResponseStore, data) -> _Prepared:
    """Everything before queueing (in the worker thread): the chat request, rendered and checked."""
    request = parse_responses(data)
    model = state.resolve_model(request.model)
    conversation = _history(store, request.previous_response_id) + request.input_items
    messages = chat_messages(request.instructions, conversation)
    if not messages:
        raise bad_request("'input' is empty: give at least one message.", "input")
    engine = state.engine
    parsed = parse_chat({**request.chat, "messages": messages}, vocab_size=engine.vocab_size,
                        defaults=engine.sampling_defaults, auto_tools=state.enable_auto_tool_choice)
    apply_tool_choice(parsed, state.tool_call_parser)
    apply_reasoning_parser(parsed, state.reasoning_parser)
    prompt = truncate(engine, render(state, parsed), parsed.params)
    check_prompt(engine, prompt, parsed.params, "input")
    return _Prepared(request, model, parsed, prompt, conversation, choice_parsers(state, parsed))


def _history(store: ResponseStore, previous_response_id: str | None) -> list[dict]:
    if previous_response_id is None:
        return []
    stored = store.get(previous_response_id)
    if stored is not None:
        return stored.history()
    if store.running(previous_response_id) is not None:
        raise bad_request(f"Previous response '{previous_response_id}' is still being generated: wait for it "
                          "to finish.", "previous_response_id")
    raise ApiError(404, f"Previous response with id '{previous_response_id}' not found (it was never stored, "
                   "was deleted, or this server's response store dropped it).", param="previous_response_id")


async def create_response(request: web.Request) -> web.StreamResponse:
    state, store = request.app[SERVER_STATE], request.app[RESPONSE_STORE]
    state.check_accepting()
    refuse_on_embedding_model(state, "Responses")
    engine = state.engine
    try:
        prepared = await read_and_prepare(request, state, lambda state_, data: _prepare(state_, store, data),
                                          always_offload=True)
        params = prepared.parsed.params
        if not await compile_structured_outputs(engine, params, prepared.parsed.structured_field, request):
            return client_closed()
    except (ApiError, InvalidParameterError) as exc:
        raise in_responses_terms(api_error_from(exc)) from None
    lora = state.lora_request(prepared.model)
    if lora is not None:
        try:
            await engine.prepare_lora(lora)
        except LoRAAdapterError as exc:
            raise ApiError(400, str(exc), param="model", code="lora_adapter_unavailable") from None
    run = ResponseRun(prepared.model, prepared.request.echo, params.temperature, params.top_p,
                      len(prepared.prompt.token_ids))
    output = OutputItems(prepared.make_parser)
    if prepared.request.stream:
        return await _stream(request, state, store, prepared, run, output, lora)
    generation = Generation(engine, run.id, [prepared.prompt], params, lora_request=lora,
                            cache_salt=prepared.parsed.cache_salt, priority=prepared.parsed.priority)
    running = Running(run, generation, prepared.request.store)
    store.start(running)
    log_request(state, run.id, "responses", generation, False)
    try:
        latest = await collect(request, state, generation, abort_is_shutdown=False)
        if latest is None:
            return client_closed()
        result = latest[0]
        completion = result.outputs[0]
        status = run.status(completion.finish_reason)
        if status == "failed":
            raise ApiError(503, "The request was aborted: the server is shutting down.", code="shutting_down")
        output.feed(completion.text)
        output.finish("completed" if status == "completed" else "incomplete")
        body = run.body(status, output.items, usage(run.num_prompt_tokens, len(completion.token_ids),
                                                    result.num_cached_tokens))
        _keep(store, running, prepared, body)
    finally:
        store.end(run.id)
    return await send_json(request, state, orjson.dumps(body))


async def _stream(request: web.Request, state: ServerState, store: ResponseStore, prepared: _Prepared,
                  run: ResponseRun, output: OutputItems, lora) -> web.StreamResponse:
    running = Running(run, None, prepared.request.store, output.items)
    writer = ResponseStreamWriter(run, output, lambda body: _keep(store, running, prepared, body))
    sink = stream_sink(state, writer)
    parsed = prepared.parsed
    running.generation = Generation(state.engine, run.id, [prepared.prompt], parsed.params, sink, lora,
                                    parsed.cache_salt, parsed.priority)
    store.start(running)
    log_request(state, run.id, "responses", running.generation, True)
    try:
        return await stream(request, state, running.generation, sink, include_usage=False, end=b"")
    finally:
        store.end(run.id)


def _keep(store: ResponseStore, running: Running, prepared: _Prepared, body: dict) -> None:
    """The final Response: stored when asked, and handed to a cancel waiting for it (even before a slow
    client of the stream has read it)."""
    running.final_body = body
    running.finished.set()
    if prepared.request.store:
        store.put(body["id"], StoredResponse(body, prepared.conversation))


def _not_found(response_id: str) -> ApiError:
    return ApiError(404, f"Response with id '{response_id}' not found.", param="response_id")


async def retrieve_response(request: web.Request) -> web.Response:
    store, response_id = request.app[RESPONSE_STORE], request.match_info["response_id"]
    if request.query.get("stream", "false").lower() not in ("false", "0"):
        raise bad_request("'stream': streaming a stored response again is not supported by this server.", "stream")
    stored = store.get(response_id)
    if stored is not None:
        return json_response(stored.body)
    running = store.running(response_id)
    if running is not None and running.store:
        finished_items = [item for item in running.output if item["status"] != "in_progress"]
        return json_response(running.run.body("in_progress", finished_items, None))
    raise _not_found(response_id)


async def cancel_response(request: web.Request) -> web.Response:
    """Stops a response still being generated and answers it as it ended (status "cancelled"); a finished
    one cannot be cancelled (a 400, as OpenAI answers)."""
    store, response_id = request.app[RESPONSE_STORE], request.match_info["response_id"]
    running = store.running(response_id)
    if running is None:
        stored = store.get(response_id)
        if stored is None:
            raise _not_found(response_id)
        raise bad_request(f"Cannot cancel response '{response_id}': it is already {stored.body['status']}; only "
                          "a response still being generated can be cancelled.", "response_id")
    running.run.cancelled = True
    running.generation.abort()
    try:
        await asyncio.wait_for(running.finished.wait(), CANCEL_WAIT_SECONDS)
    except asyncio.TimeoutError:
        pass
    return json_response(running.final_body or running.run.body("cancelled", [], None))


async def delete_response(request: web.Request) -> web.Response:
    store, response_id = request.app[RESPONSE_STORE], request.match_info["response_id"]
    if not store.delete(response_id):
        raise _not_found(response_id)
    return json_response({"id": response_id, "object": "response", "deleted": True})
