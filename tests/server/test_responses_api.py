"""OpenAI's Responses API (`/v1/responses`) with the official openai client against a live server: the same
text as chat completions, streamed events in order, function tools both ways, text.format, reasoning items,
stored responses (previous_response_id, GET, store=false, cancel, DELETE) and refusals by name.

Tool-call and reasoning texts are scripted (`scripted_output`): a random-weight model writes neither by
itself. Everything after the engine (conversion, parsers, items, events, store) is the real server.
"""
from __future__ import annotations

import asyncio
import contextlib
import json

import jsonschema
import openai
import pytest
import pytest_asyncio

from tests.server.chat_templates import HERMES_TOOLS_TEMPLATE
from tests.server.conftest import MODEL_NAME, live_server
from tests.server.scripted import scripted_output
from tests.server.test_tool_calls import (
    CLOCK_PARAMETERS,
    HERMES_CALLS,
    HERMES_TEXT,
    WEATHER_PARAMETERS,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

ASK = "What is the weather in Paris?"
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city.",
          "parameters": WEATHER_PARAMETERS, "strict": False},
         {"type": "function", "name": "get_time", "parameters": CLOCK_PARAMETERS}]
GREEDY = {"temperature": 0.0, "max_output_tokens": 12}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_path):
    options = {"chat_template": HERMES_TOOLS_TEMPLATE, "tool_call_parser": "hermes",
               "enable_auto_tool_choice": True}
    async with live_server(model_path, app_options=options, max_model_len=2048) as live:
        yield live


@contextlib.contextmanager
def reasoning_parser(server, name: str):
    before = server.state.reasoning_parser
    server.state.reasoning_parser = name
    try:
        yield
    finally:
        server.state.reasoning_parser = before


async def _events(client, **request) -> list:
    stream = await client.responses.create(model=MODEL_NAME, stream=True, **request)
    return [event async for event in stream]


def _joined(events, event_type: str) -> str:
    return "".join(event.delta for event in events if event.type == event_type)


# ---- plain text ---------------------------------------------------------------------------------------


async def test_output_text_equals_the_chat_completion_of_the_same_greedy_request(client):
    response = await client.responses.create(model=MODEL_NAME, input=ASK, **GREEDY)
    chat = await client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": ASK}],
                                                temperature=0.0, max_tokens=12)
    assert response.output_text == chat.choices[0].message.content
    assert response.id.startswith("resp_") and response.object == "response" and response.model == MODEL_NAME
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0 and usage.output_tokens_details.reasoning_tokens == 0
    assert (response.temperature, response.max_output_tokens, response.store) == (0.0, 12, True)


async def test_instructions_are_the_system_message(client):
    response = await client.responses.create(model=MODEL_NAME, input=ASK, instructions="Answer in French.",
                                             **GREEDY)
    chat = await client.chat.completions.create(
        model=MODEL_NAME, temperature=0.0, max_tokens=12,
        messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": ASK}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.instructions == "Answer in French."


async def test_input_items_of_every_role_render_as_their_chat_messages(client):
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
             {"role": "user", "content": ASK}]
    response = await client.responses.create(model=MODEL_NAME, input=items, **GREEDY)
    chat = await client.chat.completions.create(
        model=MODEL_NAME, temperature=0.0, max_tokens=12,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": ASK}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens


async def test_max_output_tokens_ends_an_incomplete_response(server, client):
    response = await client.responses.create(model=MODEL_NAME, input=ASK, temperature=0.0, max_output_tokens=4)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 4 and response.output[0].status == "incomplete"
    with scripted_output(server.engine, ["All done."]):
        response = await client.responses.create(model=MODEL_NAME, input=ASK)
    assert (response.status, response.incomplete_details, response.output_text) == ("completed", None, "All done.")
    assert response.output[0].status == "completed" and response.completed_at >= response.created_at


# ---- streaming ---------------------------------------------------------------------------------------


async def test_streamed_events_come_in_order_and_join_to_the_whole_text(client):
    whole = await client.responses.create(model=MODEL_NAME, input=ASK, **GREEDY)
    events = await _events(client, input=ASK, **GREEDY)
    types = [event.type for event in events]
    num_deltas = types.count("response.output_text.delta")
    assert num_deltas >= 2
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * num_deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.incomplete"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert _joined(events, "response.output_text.delta") == events[-4].text == whole.output_text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.id == events[0].response.id and final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert {event.item_id for event in events[2:-1] if hasattr(event, "item_id")} == {final.output[0].id}


async def test_the_stream_helper_gets_the_final_response(server, client):
    with scripted_output(server.engine, ["Sunny", " and ", "warm."]):
        async with client.responses.stream(model=MODEL_NAME, input=ASK) as stream:
            deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
            final = await stream.get_final_response()
    assert deltas == ["Sunny", " and ", "warm."]
    assert final.status == "completed" and final.output_text == "Sunny and warm."


async def test_sse_frames_name_their_event_and_end_without_done(server, http):
    with scripted_output(server.engine, ["Hi"]):
        async with http.post(server.api + "/responses",
                             json={"model": MODEL_NAME, "input": ASK, "stream": True}) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            body = (await response.read()).decode()
    frames = body.split("\n\n")
    assert frames[-1] == "" and "[DONE]" not in body
    for frame in frames[:-1]:
        event_line, data_line = frame.split("\n")
        assert json.loads(data_line.removeprefix("data: "))["type"] == event_line.removeprefix("event: ")
    assert frames[-2].startswith("event: response.completed\n")


# ---- function tools -------------------------------------------------------------------------------


async def test_function_calls_round_trip_with_previous_response_id(server, client):
    with scripted_output(server.engine, [HERMES_TEXT]):
        first = await client.responses.create(model=MODEL_NAME, input=ASK, tools=TOOLS)
    message, *calls = first.output
    assert message.type == "message" and message.content[0].text == "I will check.\n"
    assert [(call.type, call.name, call.arguments) for call in calls] == \
        [("function_call", name, arguments) for name, arguments in HERMES_CALLS]
    assert all(call.call_id.startswith("call_") and call.status == "completed" for call in calls)
    assert first.status == "completed" and first.tools[0].name == "get_weather"
    outputs = [{"type": "function_call_output", "call_id": calls[0].call_id, "output": "22 C"},
               {"type": "function_call_output", "call_id": calls[1].call_id, "output": "12:00"}]
    prompts = []
    with scripted_output(server.engine, ["It is 22 C in Tokyo."], seen_prompts=prompts):
        second = await client.responses.create(model=MODEL_NAME, input=outputs, tools=TOOLS,
                                               previous_response_id=first.id)
    assert second.output_text == "It is 22 C in Tokyo." and second.previous_response_id == first.id
    prompt = prompts[0]["prompt"]
    turns = [ASK, "I will check.", '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "F"}}',
             '{"name": "get_time", "arguments": {"utc": true}}', "<tool_response>\n22 C\n</tool_response>",
             "<tool_response>\n12:00\n</tool_response>"]
    positions = [prompt.index(turn) for turn in turns]
    assert positions == sorted(positions)


async def test_function_calls_stream_their_arguments(server, client):
    pieces = [HERMES_TEXT[i:i + 7] for i in range(0, len(HERMES_TEXT), 7)]
    with scripted_output(server.engine, pieces):
        events = await _events(client, input=ASK, tools=TOOLS, parallel_tool_calls=False)
    added = [event.item for event in events if event.type == "response.output_item.added"]
    assert [item.type for item in added] == ["message", "function_call"]
    assert added[1].name == "get_weather" and added[1].arguments == ""
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert [event.arguments for event in done] == [HERMES_CALLS[0][1]]
    assert _joined(events, "response.function_call_arguments.delta") == HERMES_CALLS[0][1]
    final = events[-1].response
    assert [item.type for item in final.output] == ["message", "function_call"]
    assert final.output[1].call_id == added[1].call_id and final.parallel_tool_calls is False


async def test_a_named_tool_choice_forces_a_valid_call(client):
    response = await client.responses.create(model=MODEL_NAME, input=ASK, tools=TOOLS, temperature=1.0,
                                             max_output_tokens=40, extra_body={"seed": 3},
                                             tool_choice={"type": "function", "name": "get_time"})
    [call] = response.output
    assert call.type == "function_call" and call.name == "get_time"
    jsonschema.validate(json.loads(call.arguments), CLOCK_PARAMETERS)


# ---- structured outputs ------------------------------------------------------------------------------

# Free whitespace between JSON tokens, which a random model emits at length: a small schema keeps its
# documents short enough to finish.
FLAG = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


async def test_text_format_json_schema_constrains_the_output(client):
    statuses = []
    for seed in range(4):
        response = await client.responses.create(
            model=MODEL_NAME, input="Is it raining?", temperature=1.0, max_output_tokens=100,
            extra_body={"seed": seed},
            text={"format": {"type": "json_schema", "name": "flag", "schema": FLAG, "strict": True}})
        statuses.append(response.status)
        if response.status == "completed":
            jsonschema.validate(json.loads(response.output_text), FLAG)
        else:
            assert response.output_text.lstrip().startswith("{")
        assert response.text.format.type == "json_schema" and response.text.format.name == "flag"
    assert "completed" in statuses


async def test_text_format_json_object_asks_the_grammar_for_any_object(server, client):
    seen = []
    with scripted_output(server.engine, ['{"ok": true}'], seen_params=seen):
        response = await client.responses.create(model=MODEL_NAME, input=ASK, text={"format": {"type": "json_object"}})
    assert seen[0].structured_outputs.json_object is True and response.output_text == '{"ok": true}'
    assert response.text.format.type == "json_object"


async def test_a_bad_text_format_schema_is_a_400_on_text_format(client):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=MODEL_NAME, input=ASK, text={"format": {
            "type": "json_schema", "name": "bad", "schema": {"type": "object", "required": "answer"}}})
    assert caught.value.body["param"] == "text.format" and "response_format" not in caught.value.body["message"]


# ---- reasoning -------------------------------------------------------------------------------------


async def test_a_reasoning_parser_gives_a_reasoning_item_before_the_message(server, client):
    pieces = ["Compare tenths", ": 8 > 1.</th", "ink>9.8 is larger."]
    with reasoning_parser(server, "deepseek_r1"), scripted_output(server.engine, pieces):
        response = await client.responses.create(model=MODEL_NAME, input="Is 9.11 larger than 9.8?",
                                                 reasoning={"effort": "low"})
    reasoning, message = response.output
    assert message.type == "message" and message.status == "completed"
    assert reasoning.type == "reasoning" and reasoning.id.startswith("rs_") and reasoning.summary == []
    assert [(part.type, part.text) for part in reasoning.content] == [("reasoning_text", "Compare tenths: 8 > 1.")]
    assert response.output_text == "9.8 is larger." and response.reasoning.effort == "low"
    with reasoning_parser(server, "deepseek_r1"), scripted_output(server.engine, pieces):
        events = await _events(client, input="Is 9.11 larger than 9.8?")
    types = [event.type for event in events]
    assert _joined(events, "response.reasoning_text.delta") == "Compare tenths: 8 > 1."
    assert types.index("response.reasoning_text.done") < types.index("response.output_text.delta")
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]


# ---- stored responses ------------------------------------------------------------------------------


async def test_previous_response_id_chains_the_conversation_without_old_instructions(server, client):
    answers = ["Paris.", "Lima.", "Tokyo."]
    questions = ["Capital of France?", "And of Peru?", "And of Japan?"]
    prompts, previous = [], None
    for question, answer in zip(questions, answers):
        with scripted_output(server.engine, [answer], seen_prompts=prompts):
            response = await client.responses.create(model=MODEL_NAME, input=question, instructions="Be terse.",
                                                     previous_response_id=previous)
        assert response.output_text == answer
        previous = response.id
    last = prompts[-1]["prompt"]
    turns = [part for pair in zip(questions, answers) for part in pair][:-1]
    positions = [last.index(turn) for turn in turns]
    assert positions == sorted(positions) and last.count("Be terse.") == 1


async def test_a_stored_response_is_retrieved_whole_and_deleted(client):
    response = await client.responses.create(model=MODEL_NAME, input=ASK, metadata={"job": "7"}, **GREEDY)
    retrieved = await client.responses.retrieve(response.id)
    assert retrieved.model_dump() == response.model_dump() and retrieved.metadata == {"job": "7"}
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_store_false_is_neither_retrievable_nor_continued(client):
    response = await client.responses.create(model=MODEL_NAME, input=ASK, store=False, **GREEDY)
    assert response.store is False
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.retrieve(response.id)
    assert caught.value.body["message"] == f"Response with id '{response.id}' not found."
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model=MODEL_NAME, input="More?", previous_response_id=response.id)
    assert caught.value.body["param"] == "previous_response_id"


async def test_cancel_stops_a_running_response_and_refuses_a_finished_one(client):
    stream = await client.responses.create(model=MODEL_NAME, input=ASK, stream=True, max_output_tokens=400,
                                           temperature=1.0, extra_body={"seed": 0})
    events = []
    async for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta":
            cancelled = await client.responses.cancel(events[0].response.id)
            assert cancelled.status == "cancelled"
    assert events[-1].type == "response.failed" and events[-1].response.status == "cancelled"
    assert events[-1].response.usage.output_tokens < 400
    assert (await client.responses.retrieve(cancelled.id)).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.cancel(cancelled.id)
    assert "already cancelled" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        await client.responses.cancel("resp_unknown")


async def test_a_whole_response_cancelled_while_running_ends_cancelled_with_its_text_so_far(server, client):
    running = asyncio.ensure_future(client.responses.create(model=MODEL_NAME, input=ASK, max_output_tokens=400,
                                                            temperature=1.0, extra_body={"seed": 1}))
    store = _store(server)
    while not store.running_ids():
        await asyncio.sleep(0.005)
    [response_id] = store.running_ids()
    in_progress = await client.responses.retrieve(response_id)
    assert in_progress.status == "in_progress" and in_progress.output == []
    await asyncio.sleep(0.05)
    cancelled = await client.responses.cancel(response_id)
    response = await running
    assert response.status == cancelled.status == "cancelled" and response.id == response_id
    assert 0 < response.usage.output_tokens < 400 and response.output[0].status == "incomplete"
    assert cancelled.output_text == response.output_text


# ---- refusals --------------------------------------------------------------------------------------


REFUSED = [
    ("image input", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is this?"},
        {"type": "input_image", "image_url": "https://example.com/cat.png"}]}]},
     "input[0].content[1]", "image input (input_image) is not supported"),
    ("built-in tool", {"input": ASK, "tools": [{"type": "web_search"}]}, "tools[0]",
     "the built-in tool 'web_search' is not supported"),
    ("background", {"input": ASK, "background": True}, "background", "background responses are not supported"),
    ("unknown field", {"input": ASK, "frequency_penalty": 1.0}, "frequency_penalty",
     "'frequency_penalty' is not a Responses API field"),
    ("conversation", {"input": ASK, "conversation": "conv_1"}, "conversation", "conversations"),
    ("built-in tool items", {"input": [{"type": "web_search_call", "id": "ws_1", "status": "completed"}]},
     "input[0]", "web_search_call items are not supported"),
    ("logprobs", {"input": ASK, "include": ["message.output_text.logprobs"]}, "include",
     "'message.output_text.logprobs' is not supported"),
    ("no input", {}, "input", "'input' is required"),
    ("bad effort", {"input": ASK, "reasoning": {"effort": "extreme"}}, "reasoning.effort", "must be one of"),
    ("bad function tool", {"input": ASK, "tools": [{"type": "function", "name": "f", "parameters": ["x"]}]},
     "tools[0].parameters", "'tools[0].parameters' must be a JSON schema object"),
    ("too long", {"input": ASK, "max_output_tokens": 5000}, "max_output_tokens", "Reduce the length"),
]


@pytest.mark.parametrize("body,param,message", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
async def test_what_is_not_built_is_refused_by_name(server, http, body, param, message):
    async with http.post(server.api + "/responses", json={"model": MODEL_NAME, **body}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


async def test_the_client_hears_a_refusal_and_an_unknown_previous_response(client):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model=MODEL_NAME, input=ASK, tools=[{"type": "file_search",
                                                                           "vector_store_ids": ["vs_1"]}])
    assert "'file_search'" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model=MODEL_NAME, input=ASK, previous_response_id="resp_nope")
    assert caught.value.body["message"].startswith("Previous response with id 'resp_nope' not found")


async def test_the_store_keeps_only_the_most_recently_used(server, client):
    store = _store(server)
    capacity, store.capacity = store.capacity, 2
    try:
        ids = []
        for _ in range(3):
            with scripted_output(server.engine, ["ok"]):
                ids.append((await client.responses.create(model=MODEL_NAME, input=ASK)).id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(ids[0])
        assert [(await client.responses.retrieve(i)).id for i in ids[1:]] == ids[1:]
    finally:
        store.capacity = capacity


def _store(server):
    from asyncserve.server.responses import RESPONSE_STORE
    return server.app[RESPONSE_STORE]


async def test_concurrent_streams_keep_their_own_events(client):
    results = await asyncio.gather(*[_events(client, input=f"Question {index}", **GREEDY) for index in range(3)])
    for events in results:
        assert [event.sequence_number for event in events] == list(range(len(events)))
        assert _joined(events, "response.output_text.delta") == events[-1].response.output_text


MALFORMED = [
    {"input": 7}, {"input": [7]}, {"input": [{"role": "robot", "content": "hi"}]},
    {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
    {"input": [{"type": "function_call", "name": "f"}]}, {"input": [{"type": "item_reference", "id": "msg_1"}]},
    {"input": ASK, "instructions": ["x"]}, {"input": ASK, "tools": {"type": "function"}},
    {"input": ASK, "tools": [{"type": "function"}]}, {"input": ASK, "tool_choice": {"type": "function"}, "tools": TOOLS},
    {"input": ASK, "tool_choice": {"type": "allowed_tools", "tools": []}, "tools": TOOLS},
    {"input": ASK, "text": {"format": "json"}}, {"input": ASK, "text": {"format": {"type": "json_schema"}}},
    {"input": ASK, "metadata": {"k": 1}}, {"input": ASK, "store": "yes"}, {"input": ASK, "max_output_tokens": 0},
    {"input": ASK, "temperature": "hot"}, {"input": ASK, "reasoning": {"summary": ["x"]}},
    {"input": ASK, "stream_options": {"include_obfuscation": False}}, {"input": ASK, "previous_response_id": 5},
]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
async def test_malformed_requests_are_400s_naming_a_field(server, http, body):
    async with http.post(server.api + "/responses", json={"model": MODEL_NAME, **body}) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["param"] and error["param"].split(".")[0].split("[")[0] in body
