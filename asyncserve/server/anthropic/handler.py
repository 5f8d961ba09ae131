"""POST /v1/messages and /v1/messages/count_tokens: an Anthropic request becomes the chat path's request
(server/chat.py renders, tokenizes and checks it), runs as one Generation, and its reply goes out as an
Anthropic message or event stream."""
from __future__ import annotations

import orjson
from aiohttp import web

from asyncserve.errors import LoRAAdapterError
from asyncserve.outputs import RequestOutput
from asyncserve.server.anthropic.blocks import ReplyBlocks, content_of, stop_reason
from asyncserve.server.anthropic.errors import error_event
from asyncserve.server.anthropic.stream import MessageStreamWriter, message_head
from asyncserve.server.anthropic.to_chat import chat_body
from asyncserve.server.chat import choice_parsers, prepare_chat, render
from asyncserve.server.embeddings import refuse_on_embedding_model
from asyncserve.server.errors import ApiError
from asyncserve.server.generation import Generation
from asyncserve.server.protocol import parse_chat
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
from asyncserve.utils.ids import random_hex_id


def _prepare(state: ServerState, data):
    return prepare_chat(state, chat_body(data, auto_tools=state.enable_auto_tool_choice))


async def create_message(request: web.Request) -> web.StreamResponse:
    state = request.app[SERVER_STATE]
    state.check_accepting()
    refuse_on_embedding_model(state, "Messages")
    prepared = await read_and_prepare(request, state, _prepare, always_offload=True)
    engine, parsed, prompts = state.engine, prepared.parsed, prepared.prompts
    message_id = f"msg_{random_hex_id()}"
    lora = state.lora_request(prepared.model)  # a served adapter's name: its LoRARequest
    if lora is not None:
        try:
            await engine.prepare_lora(lora)
        except LoRAAdapterError as exc:
            raise ApiError(400, str(exc), param="model", code="lora_adapter_unavailable") from None
    # tool_choice "any" and "tool" are grammars, as the chat path's "required" and named functions
    if not await compile_structured_outputs(engine, parsed.params, parsed.structured_field, request):
        return client_closed()
    make_parser = choice_parsers(state, parsed)
    if parsed.stream:
        writer = MessageStreamWriter(message_id, prepared.model, len(prompts[0].token_ids), make_parser)
        sink = stream_sink(state, writer)
        generation = Generation(engine, message_id, prompts, parsed.params, sink, lora)
        log_request(state, message_id, "messages", generation, True)
        return await stream(request, state, generation, sink, False, end=b"", error_event=error_event)
    generation = Generation(engine, message_id, prompts, parsed.params, lora_request=lora)
    log_request(state, message_id, "messages", generation, False)
    latest = await collect(request, state, generation)
    if latest is None:
        return client_closed()
    body = message_body(message_id, prepared.model, make_parser, latest[0])
    return await send_json(request, state, orjson.dumps(body))


def message_body(message_id: str, model: str, make_parser, output: RequestOutput) -> dict:
    """The whole reply: its text through the same block events a stream sends."""
    completion = output.outputs[0]
    blocks = ReplyBlocks(make_parser)
    content = content_of(blocks.feed(completion.text) + blocks.finish())
    reason, sequence = stop_reason(completion.finish_reason, completion.stop_reason, blocks.num_tool_calls)
    return {**message_head(message_id, model), "content": content, "stop_reason": reason,
            "stop_sequence": sequence, "usage": {"input_tokens": len(output.prompt_token_ids),
                                                 "output_tokens": len(completion.token_ids)}}


def _count(state: ServerState, data) -> dict:
    # Tool choice changes what is generated, never the prompt: count with "auto" allowed.
    body = chat_body(data, auto_tools=True, counting=True)
    state.resolve_model(body["model"])
    engine = state.engine
    parsed = parse_chat(body, vocab_size=engine.vocab_size, defaults=engine.sampling_defaults, auto_tools=True)
    return {"input_tokens": len(render(state, parsed).token_ids)}


async def count_tokens(request: web.Request) -> web.Response:
    """The prompt's length as /v1/messages would render it, through the same chat template."""
    state = request.app[SERVER_STATE]
    refuse_on_embedding_model(state, "Messages")
    return json_response(await read_and_prepare(request, state, _count))
