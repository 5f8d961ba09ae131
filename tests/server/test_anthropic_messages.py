"""Anthropic's Messages API with the official `anthropic` client: replies equal the chat path's for the same
greedy request, streams (Anthropic's event types, in order) equal whole replies, tools and thinking come
out as tool_use and thinking blocks, count_tokens counts the rendered prompt, and errors (x-api-key auth
included) take Anthropic's shape.

Tool calls and thinking script the engine's text (`scripted_output`): a random-weight model writes neither.
"""
from __future__ import annotations

import anthropic
import orjson
import pytest
import pytest_asyncio

from tests.server.chat_templates import HERMES_TOOLS_TEMPLATE
from tests.server.conftest import MODEL_NAME, live_server
from tests.server.scripted import scripted_output

pytestmark = pytest.mark.asyncio(loop_scope="session")

ASK = [{"role": "user", "content": "Once upon a time, in a land far away,"}]
SYSTEM = "You are terse."
WEATHER = {"name": "get_weather", "description": "Weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# The newest clients have no sampling arguments (Claude's newest models take none); the API still does.
GREEDY = {"extra_body": {"temperature": 0}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_path):
    options = {"chat_template": HERMES_TOOLS_TEMPLATE, "tool_call_parser": "hermes",
               "enable_auto_tool_choice": True, "reasoning_parser": "qwen3"}
    async with live_server(model_path, app_options=options, max_model_len=1024) as live:
        yield live


@pytest_asyncio.fixture(loop_scope="session")
async def claude(server):
    async with anthropic.AsyncAnthropic(base_url=server.url, api_key="unused", max_retries=0,
                                        timeout=60) as client:
        yield client


def _dumped(content) -> list[dict]:
    """Blocks as plain data (a stream's final message holds the parsed-block subclasses)."""
    return [block.model_dump(exclude={"parsed_output"}) for block in content]


async def _chat(http, server, **body) -> dict:
    async with http.post(server.api + "/chat/completions", json={"model": MODEL_NAME, **body}) as response:
        assert response.status == 200
        return await response.json()


async def _raw_events(http, server, **body) -> list[tuple[str, dict]]:
    """A stream's (event line, data) pairs, checking each frame has both lines."""
    async with http.post(server.url + "/v1/messages", json={"model": MODEL_NAME, "stream": True, **body}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        raw = (await response.read()).decode()
    events = []
    for frame in raw.split("\n\n")[:-1]:
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        data = orjson.loads(data_line[len("data: "):])
        assert data["type"] == event_line[len("event: "):]
        events.append(data)
    assert raw.endswith("\n\n")
    return events


# ---- plain replies --------------------------------------------------------------------------------

async def test_create_equals_the_chat_completion_of_the_same_greedy_request(claude, server, http):
    message = await claude.messages.create(model=MODEL_NAME, max_tokens=12, messages=ASK, **GREEDY)
    chat = await _chat(http, server, messages=ASK, max_tokens=12, temperature=0)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == MODEL_NAME
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == chat["choices"][0]["message"]["content"]
    assert message.usage.input_tokens == chat["usage"]["prompt_tokens"]
    assert message.usage.output_tokens == chat["usage"]["completion_tokens"]
    expected = {"length": "max_tokens", "stop": "end_turn"}[chat["choices"][0]["finish_reason"]]
    assert message.stop_reason == expected and message.stop_sequence is None


async def test_system_prompt_as_string_or_text_blocks_is_the_chat_system_message(claude, server, http):
    chat = await _chat(http, server, messages=[{"role": "system", "content": SYSTEM}, *ASK], max_tokens=8,
                       temperature=0)
    for system in (SYSTEM, [{"type": "text", "text": SYSTEM}]):
        message = await claude.messages.create(model=MODEL_NAME, max_tokens=8, system=system, messages=ASK,
                                               **GREEDY)
        assert message.content[0].text == chat["choices"][0]["message"]["content"]
        assert message.usage.input_tokens == chat["usage"]["prompt_tokens"]
    plain = await claude.messages.count_tokens(model=MODEL_NAME, messages=ASK)
    assert plain.input_tokens < chat["usage"]["prompt_tokens"]


async def test_stop_sequence_ends_the_text_and_is_named(claude):
    whole = (await claude.messages.create(model=MODEL_NAME, max_tokens=16, messages=ASK, **GREEDY))
    text = whole.content[0].text
    assert len(text.strip()) >= 6, text  # the greedy reply is long enough to cut
    stop = text.strip()[3:6]
    message = await claude.messages.create(model=MODEL_NAME, max_tokens=16, messages=ASK, **GREEDY,
                                           stop_sequences=["NEVER-WRITTEN", stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[:text.index(stop)]


async def test_max_tokens_ends_the_reply_with_stop_reason_max_tokens(claude):
    message = await claude.messages.create(model=MODEL_NAME, max_tokens=2, messages=ASK, **GREEDY)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens > 0


# ---- streaming ------------------------------------------------------------------------------------

async def test_stream_helpers_give_the_non_streamed_reply(claude):
    whole = await claude.messages.create(model=MODEL_NAME, max_tokens=12, messages=ASK, **GREEDY)
    async with claude.messages.stream(model=MODEL_NAME, max_tokens=12, messages=ASK, **GREEDY) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == whole.content[0].text
    assert _dumped(final.content) == _dumped(whole.content)
    assert (final.stop_reason, final.usage.input_tokens, final.usage.output_tokens) == \
        (whole.stop_reason, whole.usage.input_tokens, whole.usage.output_tokens)


async def test_stream_sends_anthropic_events_in_order(server, http):
    events = await _raw_events(http, server, max_tokens=6, temperature=0, messages=ASK)
    types = [event["type"] for event in events]
    assert types[:2] == ["message_start", "ping"]
    assert types[2] == "content_block_start" and set(types[3:-3]) == {"content_block_delta"}
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    start = events[0]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[2]["content_block"] == {"type": "text", "text": ""}
    assert {event["delta"]["type"] for event in events[3:-3]} == {"text_delta"}
    assert events[-2]["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert events[-2]["usage"] == {"output_tokens": 6}


# ---- tools ------------------------------------------------------------------------------------------

async def test_tool_call_becomes_a_tool_use_block_and_its_result_is_accepted(claude, server):
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    with scripted_output(server.engine, ["Let me check.\n", CALL[:20], CALL[20:]]):
        message = await claude.messages.create(model=MODEL_NAME, max_tokens=64, messages=ask, tools=[WEATHER])
    text, call = message.content
    assert text.type == "text" and text.text == "Let me check.\n"
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
    assert message.stop_reason == "tool_use"

    follow_up = ask + [{"role": "assistant", "content": message.content},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                                     "content": [{"type": "text", "text": "21 C, sunny"}]}]}]
    prompts = []
    with scripted_output(server.engine, ["Sunny, 21 C."], seen_prompts=prompts):
        answer = await claude.messages.create(model=MODEL_NAME, max_tokens=64, messages=follow_up, tools=[WEATHER])
    assert [(block.type, block.text) for block in answer.content] == [("text", "Sunny, 21 C.")]
    assert answer.stop_reason == "end_turn"
    rendered = prompts[0]["prompt"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in rendered
    assert "<tool_response>\n21 C, sunny\n</tool_response>" in rendered


async def test_streamed_tool_call_arrives_as_input_json_deltas(claude, server, http):
    with scripted_output(server.engine, [CALL[:25], CALL[25:40], CALL[40:]]):
        async with claude.messages.stream(model=MODEL_NAME, max_tokens=64, messages=ASK, tools=[WEATHER],
                                          tool_choice={"type": "auto"}) as stream:
            final = await stream.get_final_message()
    [call] = final.content
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})
    assert final.stop_reason == "tool_use"
    with scripted_output(server.engine, [CALL[:25], CALL[25:]]):
        events = await _raw_events(http, server, max_tokens=64, messages=ASK, tools=[WEATHER])
    assert {event["delta"]["type"] for event in events if event["type"] == "content_block_delta"} == \
        {"input_json_delta"}


@pytest.mark.parametrize("tool_choice, output", [
    ({"type": "tool", "name": "get_weather"}, '{"city": "Lima"}'),
    ({"type": "any"}, '[{"name": "get_weather", "parameters": {"city": "Lima"}}]'),
])
async def test_forced_tool_choice_is_a_grammar_and_its_output_a_tool_use(claude, server, tool_choice, output):
    params = []
    with scripted_output(server.engine, [output[:9], output[9:]], seen_params=params):
        message = await claude.messages.create(model=MODEL_NAME, max_tokens=64, messages=ASK, tools=[WEATHER],
                                               tool_choice=tool_choice)
    [call] = message.content
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Lima"})
    assert message.stop_reason == "tool_use"
    schema = params[0].structured_outputs.json
    assert schema == WEATHER["input_schema"] if tool_choice["type"] == "tool" else schema["type"] == "array"


# ---- thinking -----------------------------------------------------------------------------------------

THOUGHT = ["<thi", "nk>Compare 9.11 and ", "9.8.</th", "ink>\n\n9.8 is larger."]


async def test_reasoning_becomes_thinking_blocks(claude, server):
    with scripted_output(server.engine, THOUGHT):
        message = await claude.messages.create(model=MODEL_NAME, max_tokens=64, messages=ASK,
                                               thinking={"type": "enabled", "budget_tokens": 1024})
    thinking, text = message.content
    assert (thinking.type, thinking.thinking) == ("thinking", "Compare 9.11 and 9.8.")
    assert thinking.signature
    assert (text.type, text.text) == ("text", "\n\n9.8 is larger.")
    with scripted_output(server.engine, THOUGHT):
        async with claude.messages.stream(model=MODEL_NAME, max_tokens=64, messages=ASK,
                                          thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
            kinds = [event.delta.type async for event in stream if event.type == "content_block_delta"]
            final = await stream.get_final_message()
    assert _dumped(final.content) == _dumped(message.content)
    assert kinds[0] == "thinking_delta" and "signature_delta" in kinds and kinds[-1] == "text_delta"


async def test_thinking_disabled_leaves_the_text_whole(claude, server):
    # qwen3's parser reads the template's enable_thinking, which `thinking` sets.
    with scripted_output(server.engine, THOUGHT):
        message = await claude.messages.create(model=MODEL_NAME, max_tokens=64, messages=ASK,
                                               thinking={"type": "disabled"})
    assert [(block.type, block.text) for block in message.content] == [("text", "".join(THOUGHT))]


# ---- count_tokens -------------------------------------------------------------------------------------

async def test_count_tokens_equals_the_prompt_tokens_of_a_reply(claude):
    for tools in ([], [WEATHER]):
        counted = await claude.messages.count_tokens(model=MODEL_NAME, system=SYSTEM, messages=ASK, tools=tools)
        message = await claude.messages.create(model=MODEL_NAME, max_tokens=1, system=SYSTEM, messages=ASK,
                                               tools=tools, tool_choice={"type": "none"})
        assert counted.input_tokens == message.usage.input_tokens


# ---- errors and auth ------------------------------------------------------------------------------

async def _post_raw(http, url: str, body, **headers) -> tuple[int, dict]:
    async with http.post(url, data=body if isinstance(body, bytes) else orjson.dumps(body),
                         headers={"Content-Type": "application/json", **headers}) as response:
        return response.status, await response.json()


def _anthropic_error(body: dict, kind: str, words: str) -> None:
    assert body["type"] == "error" and body["error"]["type"] == kind
    assert words in body["error"]["message"]


@pytest.mark.parametrize("body, words", [
    ({"model": MODEL_NAME, "messages": ASK}, "'max_tokens' is required"),
    ({"model": MODEL_NAME, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     "image content blocks are not supported"),
    ({"model": MODEL_NAME, "max_tokens": 8, "messages": [{"role": "system", "content": "x"}]}, "top-level 'system'"),
    ({"model": MODEL_NAME, "max_tokens": 8, "messages": ASK, "temperature": 1.5}, "'temperature'"),
    ({"model": MODEL_NAME, "max_tokens": 8, "messages": ASK, "mcp_servers": [{"url": "x"}]}, "MCP servers"),
    ({"model": MODEL_NAME, "max_tokens": 8, "messages": ASK,
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    (b"{not json", "not valid JSON"),
])
async def test_bad_input_is_a_400_in_anthropic_shape(server, http, body, words):
    status, error = await _post_raw(http, server.url + "/v1/messages", body)
    assert status == 400
    _anthropic_error(error, "invalid_request_error", words)


async def test_client_raises_typed_errors_for_bad_blocks_and_unknown_models(claude):
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(model=MODEL_NAME, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]}])
    _anthropic_error(caught.value.body, "invalid_request_error", "image")
    with pytest.raises(anthropic.NotFoundError) as caught:
        await claude.messages.create(model="claude-nonexistent", max_tokens=8, messages=ASK)
    _anthropic_error(caught.value.body, "not_found_error", "claude-nonexistent")
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.count_tokens(model="claude-nonexistent", messages=ASK)


async def test_an_unknown_field_is_refused_by_name_as_anthropic_does(claude, server, http):
    for call in (claude.messages.create, claude.messages.count_tokens):
        with pytest.raises(anthropic.BadRequestError) as caught:
            await call(model=MODEL_NAME, messages=ASK, extra_body={"frobnicate": 1},
                       **({"max_tokens": 2} if call == claude.messages.create else {}))
        _anthropic_error(caught.value.body, "invalid_request_error", "frobnicate: Extra inputs are not permitted")
    status, error = await _post_raw(http, server.url + "/v1/messages/count_tokens",
                                    {"model": MODEL_NAME, "messages": ASK, "max_tokens": 2})
    assert status == 400 and error["error"]["message"].startswith("max_tokens: ")  # no such count field


async def test_fields_that_mean_nothing_to_a_local_server_are_accepted(claude):
    message = await claude.messages.create(
        model=MODEL_NAME, max_tokens=2, messages=ASK, metadata={"user_id": "u-1"}, service_tier="auto",
        extra_body={"cache_control": {"type": "ephemeral"}, "speed": "standard", "inference_geo": "us",
                    "container": None, "mcp_servers": []})
    assert message.usage.output_tokens > 0


async def test_an_aborted_reply_is_overloaded_whole_or_an_error_event_streamed(server, http):
    body = {"model": MODEL_NAME, "max_tokens": 8, "messages": ASK}
    with scripted_output(server.engine, ["Once", " upon"], finish_reason="abort"):
        status, error = await _post_raw(http, server.url + "/v1/messages", body)
    assert status == 529  # Anthropic's "overloaded": its clients retry later
    _anthropic_error(error, "overloaded_error", "shutting down")
    with scripted_output(server.engine, ["Once", " upon"], finish_reason="abort"):
        events = await _raw_events(http, server, **body)
    assert [event["type"] for event in events][-3:] == ["content_block_delta", "content_block_stop", "error"]
    assert events[-1]["error"]["type"] == "overloaded_error"


async def test_openai_routes_keep_the_openai_error_shape(server, http):
    status, body = await _post_raw(http, server.api + "/chat/completions", {"model": "nope", "messages": ASK})
    assert status == 404 and body["error"]["code"] == "model_not_found" and "type" not in body


async def test_x_api_key_and_bearer_are_accepted_and_a_wrong_key_is_a_401(model_path, http):
    async with live_server(model_path, app_options={"api_key": "s3cret"}) as live:
        for credentials in ({"api_key": "s3cret"}, {"auth_token": "s3cret"}):  # x-api-key, then Bearer
            async with anthropic.AsyncAnthropic(base_url=live.url, max_retries=0, **credentials) as client:
                message = await client.messages.create(model=MODEL_NAME, max_tokens=2, messages=ASK)
                assert message.usage.output_tokens > 0
                assert (await client.messages.count_tokens(model=MODEL_NAME, messages=ASK)).input_tokens > 0
        async with anthropic.AsyncAnthropic(base_url=live.url, api_key="wrong", max_retries=0) as client:
            with pytest.raises(anthropic.AuthenticationError) as caught:
                await client.messages.create(model=MODEL_NAME, max_tokens=2, messages=ASK)
        assert caught.value.status_code == 401
        _anthropic_error(caught.value.body, "authentication_error", "x-api-key")
        # x-api-key is the Messages routes' header only: the OpenAI routes still ask for Bearer
        status, body = await _post_raw(http, live.api + "/chat/completions", {"messages": ASK, "max_tokens": 2},
                                       **{"x-api-key": "s3cret"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
