"""The one request skeleton that /v1/completions and /v1/chat/completions share: read and prepare off the
loop when big, then beam search, a stream of SSE frames, or one JSON body. An endpoint supplies only a
`PreparedRequest`: its parsed fields, its prompts, and how its responses look."""
from __future__ import annotations

import time
from typing import Callable, Protocol

from aiohttp import web

from asyncserve.errors import LoRAAdapterError
from asyncserve.outputs import RequestOutput
from asyncserve.server.beam import (
    BeamGeneration,
    beam_search_outputs,
    check_beam_request,
)
from asyncserve.server.embeddings import refuse_on_embedding_model
from asyncserve.server.errors import ApiError, bad_request
from asyncserve.server.generation import Generation, Prompt
from asyncserve.server.serving import (
    OFFLOAD_RESPONSE_ENTRIES,
    client_closed,
    collect,
    json_response,
    log_request,
    read_and_prepare,
    send_json,
    stream,
    stream_sink,
)
from asyncserve.server.sse import ChunkEncoder
from asyncserve.server.state import SERVER_STATE, ServerState
from asyncserve.server.structured import compile_structured_outputs


class PreparedRequest(Protocol):
    kind: str            # "completions" or "chat": logs
    id_prefix: str       # "cmpl" or "chatcmpl"
    chunk_object: str    # the streamed chunks' "object"
    chat: bool
    model: str
    parsed: object       # CompletionRequest or ChatRequest
    prompts: list[Prompt]

    def body(self, state: ServerState, response_id: str, created: int, generation,
             latest: dict[int, RequestOutput]) -> dict: ...

    def encode_body(self, state: ServerState, response_id: str, created: int, generation,
                    latest: dict[int, RequestOutput]) -> bytes: ...

    def stream_writer(self, state: ServerState, encoder: ChunkEncoder): ...

    def num_entries(self, latest: dict[int, RequestOutput]) -> int: ...


async def handle_generation(request: web.Request,
                            prepare: Callable[[ServerState, dict], PreparedRequest],
                            image_urls: bool = False) -> web.StreamResponse:
    state = request.app[SERVER_STATE]
    state.check_accepting()
    refuse_on_embedding_model(state, "Chat Completions" if request.path.endswith("/chat/completions")
                              else "Completions")
    # Off the loop whatever the size: a burst of hundreds of arrivals (a benchmark's start, a retry storm)
    # would otherwise parse, render and tokenize them all on it, one after another.
    prepared = await read_and_prepare(request, state, prepare, always_offload=True, image_urls=image_urls)
    engine, parsed = state.engine, prepared.parsed
    response_id = (f"{prepared.id_prefix}-{parsed.request_id}" if parsed.request_id is not None
                   else state.new_id(prepared.id_prefix))
    if parsed.request_id is not None and engine.llm_engine.requests.keys() & {f"{response_id}-0"}:
        raise bad_request(f"request_id {parsed.request_id!r} is in use by a request still running.", "request_id")
    created = int(time.time())
    lora = state.lora_request(prepared.model)  # a served adapter's name: its LoRARequest
    if lora is not None:
        if parsed.use_beam_search:
            raise bad_request("Beam search with a LoRA adapter is not supported yet.", "use_beam_search")
        try:
            await engine.prepare_lora(lora)  # its files read off the loop, once
        except LoRAAdapterError as exc:
            raise ApiError(400, str(exc), param="model", code="lora_adapter_unavailable") from None
    if parsed.use_beam_search:
        check_beam_request(parsed.params, parsed.stream, parsed.structured_field, engine.max_logprobs)
        latest = await beam_search_outputs(engine, prepared.prompts, parsed.params, parsed.length_penalty)
        return json_response(prepared.body(state, response_id, created, BeamGeneration(prepared.prompts),
                                           latest))
    if not await compile_structured_outputs(engine, parsed.params, parsed.structured_field, request):
        return client_closed()
    if parsed.stream:
        encoder = ChunkEncoder(response_id, prepared.chunk_object, created, prepared.model,
                               parsed.include_usage, chat=prepared.chat)
        sink = stream_sink(state, prepared.stream_writer(state, encoder))
        generation = Generation(engine, response_id, prepared.prompts, parsed.params, sink, lora,
                                parsed.cache_salt, parsed.priority)
        log_request(state, response_id, prepared.kind, generation, parsed.stream)
        return await stream(request, state, generation, sink, parsed.include_usage)
    generation = Generation(engine, response_id, prepared.prompts, parsed.params, lora_request=lora,
                            cache_salt=parsed.cache_salt, priority=parsed.priority)
    log_request(state, response_id, prepared.kind, generation, parsed.stream)
    latest = await collect(request, state, generation)
    if latest is None:
        return client_closed()
    big = prepared.num_entries(latest) > OFFLOAD_RESPONSE_ENTRIES
    body = await state.run(big, prepared.encode_body, state, response_id, created, generation, latest)
    return await send_json(request, state, body)
