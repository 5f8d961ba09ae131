"""Tool calling over HTTP with the official openai client: tool definitions checked (400s), tool turns
rendered through a template's tools support, "required" and named functions forced by the grammar (real
model, random weights, temperature 1), and "auto" parsed from the model's text.

The "auto" tests script the engine's output text (`scripted_output`): a random-weight model never writes a
tool call by itself. Everything after the engine (HTTP, parsing, deltas, bodies) is the real server.
"""
from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
import pytest_asyncio

from tests.server.chat_templates import HERMES_TOOLS_TEMPLATE
from tests.server.conftest import MODEL_NAME, live_server
from tests.server.scripted import scripted_output

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHAT = "/v1/chat/completions"
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                   "unit": {"type": "string", "enum": ["C", "F"]},
                   "days": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["city", "unit"], "additionalProperties": False,
}
CLOCK_PARAMETERS = {"type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
                    "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                      "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "get_time", "parameters": CLOCK_PARAMETERS}},
]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "get_time": CLOCK_PARAMETERS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_path):
    options = {"chat_template": HERMES_TOOLS_TEMPLATE, "tool_call_parser": "hermes",
               "enable_auto_tool_choice": True}
    async with live_server(model_path, app_options=options, max_model_len=2048) as live:  # tools make long prompts
        yield live


async def _post(http, server, **body) -> tuple[int, dict]:
    async with http.post(server.url + CHAT, json={"model": MODEL_NAME, "messages": ASK, **body}) as response:
        return response.status, await response.json()


# ---- tool definitions and tool_choice: 400s naming the problem ------------------------------------

def _tool(**function):
    return [{"type": "function", "function": function}]


BAD = [
    ("missing name", {"tools": _tool(parameters=CLOCK_PARAMETERS)}, "tools[0].function.name", "is required"),
    ("empty name", {"tools": _tool(name="")}, "tools[0].function.name", "non-empty"),
    ("parameters not an object", {"tools": _tool(name="f", parameters=["x"])}, "tools[0].function.parameters",
     "must be a JSON schema object"),
    ("invalid schema", {"tools": _tool(name="f", parameters={"type": "objekt"})}, "tools[0].function.parameters",
     "is not a valid JSON schema"),
    ("invalid nested schema", {"tools": _tool(name="f", parameters={
        "type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}})},
     "tools[0].function.parameters", "properties/a/minimum"),
    ("not a function tool", {"tools": [{"type": "code_interpreter"}]}, "tools[0]", "only function tools"),
    ("tools not an array", {"tools": {"name": "f"}}, "tools", "must be an array"),
    ("duplicate names", {"tools": TOOLS + TOOLS[:1]}, "tools[2]", "twice"),
    ("unknown named function", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "'nope', which is not in 'tools'"),
    ("tool_choice without tools", {"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
    ("named tool_choice without tools", {"tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tool_choice", "needs 'tools'"),
    ("bad tool_choice", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "must be"),
    ("bad parallel_tool_calls", {"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls",
     "true or false"),
    ("bad assistant tool_calls", {"messages": ASK + [{"role": "assistant", "tool_calls": [{"function": 3}]}]},
     "messages[1].tool_calls", "must be"),
]


@pytest.mark.parametrize("case,body,param,message", BAD, ids=[case[0] for case in BAD])
async def test_bad_tool_definitions_get_400_naming_the_problem(server, http, case, body, param, message):
    status, payload = await _post(http, server, max_tokens=2, **body)
    assert status == 400, payload
    assert payload["error"]["param"] == param
    assert message in payload["error"]["message"]


async def test_auto_tool_choice_needs_the_server_flags_as_in_vllm(server, http):
    server.state.enable_auto_tool_choice = False
    try:
        for body in ({"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}):
            status, payload = await _post(http, server, max_tokens=2, **body)
            assert status == 400
            assert '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser' in \
                payload["error"]["message"]
        status, _ = await _post(http, server, max_tokens=2, tools=TOOLS, tool_choice="none")
        assert status == 200
    finally:
        server.state.enable_auto_tool_choice = True


async def test_tools_in_completions_are_refused(server, http):
    async with http.post(server.url + "/v1/completions",
                         json={"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "tools": TOOLS}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "tools"


# ---- tool turns through the chat template ---------------------------------------------------------

CONVERSATION = ASK + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"},
]


async def test_tool_calls_and_results_render_through_the_templates_tools_support(server, http, client):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(server.engine.model_path)
    template_messages = [ASK[0], {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"}]
    expected = tokenizer.apply_chat_template(template_messages, tools=TOOLS, chat_template=HERMES_TOOLS_TEMPLATE,
                                             add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n{\"temperature\": 21}\n</tool_response>" in expected
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}' in expected
    assert '"description": "Weather in a city."' in expected
    async with http.post(server.url + "/tokenize", json={"model": MODEL_NAME, "messages": CONVERSATION,
                                                         "tools": TOOLS}) as response:
        tokens = (await response.json())["tokens"]
    assert tokens == tokenizer.encode(expected, add_special_tokens=False)
    result = await client.chat.completions.create(model=MODEL_NAME, messages=CONVERSATION, tools=TOOLS,
                                                  tool_choice="none", max_tokens=2)
    assert result.usage.prompt_tokens == len(tokens)


# ---- "required" and named functions: the grammar forces valid calls -------------------------------

SEEDS = range(12)


def _validated(calls) -> list[tuple[str, dict]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS[call.function.name])
        out.append((call.function.name, call.function.arguments))
    return out


async def _streamed_calls(client, **request):
    """Reassembles a stream as OpenAI's docs do; checks each delta's shape on the way."""
    calls: dict[int, dict] = {}
    finish_reason, content = None, ""
    stream = await client.chat.completions.create(model=MODEL_NAME, stream=True, **request)
    async for chunk in stream:
        choice = chunk.choices[0]
        finish_reason = choice.finish_reason or finish_reason
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.index not in calls:  # the first delta of a call: id, type, name, arguments ""
                assert delta.id and delta.type == "function" and delta.function.name
                assert delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                assert delta.id is None and delta.function.name is None
                calls[delta.index]["arguments"] += delta.function.arguments
    assert sorted(calls) == list(range(len(calls)))
    return [calls[i] for i in sorted(calls)], content, finish_reason


@pytest.mark.parametrize("parallel", [True, False])
async def test_required_always_gives_calls_whose_arguments_validate(client, parallel):
    request = dict(messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, max_tokens=300,
                   parallel_tool_calls=parallel)
    results = await asyncio.gather(*(client.chat.completions.create(model=MODEL_NAME, seed=seed, **request)
                                     for seed in SEEDS))
    outputs = []
    for seed, result in zip(SEEDS, results):
        choice = result.choices[0]
        assert choice.finish_reason == "tool_calls", (seed, choice)
        assert choice.message.content is None
        calls = _validated(choice.message.tool_calls)
        assert calls and (parallel or len(calls) == 1)
        outputs.append(calls)
        streamed, content, finish_reason = await _streamed_calls(client, seed=seed, **request)
        assert [(c["name"], c["arguments"]) for c in streamed] == calls
        assert content == "" and finish_reason == "tool_calls"
    assert len({tuple(calls) for calls in outputs}) > 1  # sampled at temperature 1, the grammar kept it valid
    assert any(len(calls) > 1 for calls in outputs) == parallel


@pytest.mark.parametrize("function", ["get_weather", "get_time"])
async def test_a_named_function_is_always_called_with_valid_arguments(client, function):
    request = dict(messages=ASK, tools=TOOLS, temperature=1.0, max_tokens=200,
                   tool_choice={"type": "function", "function": {"name": function}})
    results = await asyncio.gather(*(client.chat.completions.create(model=MODEL_NAME, seed=seed, **request)
                                     for seed in SEEDS))
    for seed, result in zip(SEEDS, results):
        choice = result.choices[0]
        assert choice.finish_reason == "tool_calls"
        calls = _validated(choice.message.tool_calls)
        assert [name for name, _ in calls] == [function]
        streamed, _, finish_reason = await _streamed_calls(client, seed=seed, **request)
        assert [(c["name"], c["arguments"]) for c in streamed] == calls and finish_reason == "tool_calls"


async def test_forced_calls_cannot_be_combined_with_another_output_constraint(server, http):
    status, payload = await _post(http, server, tools=TOOLS, tool_choice="required",
                                  structured_outputs={"regex": "[a-z]+"})
    assert status == 400 and payload["error"]["param"] == "tool_choice"


# ---- "auto": the model's own text, parsed (scripted engine output) ---------------------------------

HERMES_TEXT = ('I will check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "F"}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"utc": true}}\n</tool_call>')
HERMES_CALLS = [("get_weather", '{"city": "Tokyo", "unit": "F"}'), ("get_time", '{"utc": true}')]


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


async def test_auto_parses_hermes_calls_from_the_model_text(server, client):
    with scripted_output(server.engine, [HERMES_TEXT]):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS)
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "I will check.\n"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == HERMES_CALLS
    assert len({c.id for c in choice.message.tool_calls}) == 2
    # the reply goes back as it came, with the tool's result: the next turn renders
    messages = ASK + [choice.message, {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id,
                                       "content": "18 F"}]
    follow_up = await client.chat.completions.create(model=MODEL_NAME, messages=messages, tools=TOOLS,
                                                     tool_choice="none", max_tokens=2)
    assert follow_up.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("size", [1, 3, 11, 1000])
async def test_auto_streams_hermes_calls_the_same_for_any_cut(server, client, size):
    with scripted_output(server.engine, _pieces(HERMES_TEXT, size)):
        calls, content, finish_reason = await _streamed_calls(client, messages=ASK, tools=TOOLS)
    assert [(c["name"], c["arguments"]) for c in calls] == HERMES_CALLS
    assert content == "I will check.\n" and finish_reason == "tool_calls"


async def test_auto_with_hermes_keeps_special_tokens_as_vllm_does(server, client):
    seen = []
    with scripted_output(server.engine, ["x"], seen_params=seen):
        await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS)
        await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none")
    assert [params.skip_special_tokens for params in seen] == [False, True]


async def test_auto_without_a_call_is_plain_content_and_stop(server, client):
    with scripted_output(server.engine, ["Just text, ", "no <tool", " calls."]):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS)
    assert result.choices[0].message.content == "Just text, no <tool calls."
    assert not result.choices[0].message.tool_calls and result.choices[0].finish_reason == "stop"


async def test_parallel_tool_calls_false_keeps_the_first_call(server, client):
    with scripted_output(server.engine, _pieces(HERMES_TEXT, 5)):
        calls, _, _ = await _streamed_calls(client, messages=ASK, tools=TOOLS, parallel_tool_calls=False)
    assert [(c["name"], c["arguments"]) for c in calls] == HERMES_CALLS[:1]


async def test_tool_choice_none_never_returns_calls(server, client):
    with scripted_output(server.engine, [HERMES_TEXT]):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="none")
    assert result.choices[0].message.content == HERMES_TEXT
    assert not result.choices[0].message.tool_calls and result.choices[0].finish_reason == "stop"


async def test_a_call_cut_by_max_tokens_keeps_finish_reason_length(server, client):
    with scripted_output(server.engine, ['<tool_call>{"name": "get_time", "arguments": {"ut'], "length"):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS)
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].message.tool_calls[0].function.arguments == '{"ut'


async def test_auto_parses_llama3_json_calls(server, client):
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima", "unit": "C"}}; ' \
           '{"name": "get_time", "parameters": {"utc": false}}'
    server.state.tool_call_parser = "llama3_json"
    try:
        with scripted_output(server.engine, [text]):
            whole = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS)
        with scripted_output(server.engine, _pieces(text, 2)):
            streamed, content, finish_reason = await _streamed_calls(client, messages=ASK, tools=TOOLS)
    finally:
        server.state.tool_call_parser = "hermes"
    expected = [("get_weather", '{"city": "Lima", "unit": "C"}'), ("get_time", '{"utc": false}')]
    assert [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls] == expected
    assert whole.choices[0].message.content is None and whole.choices[0].finish_reason == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == expected
    assert content == "" and finish_reason == "tool_calls"


# ---- "auto" on the real engine: a one-option choice makes the model write a known tool call --------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_auto_parses_calls_the_real_model_writes(client, temperature):
    forced = {"structured_outputs": {"choice": [HERMES_TEXT]}}
    whole = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, seed=3,
                                                 temperature=temperature, max_tokens=200, extra_body=forced)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check.\n"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == HERMES_CALLS
    calls, content, finish_reason = await _streamed_calls(client, messages=ASK, tools=TOOLS, seed=3,
                                                          temperature=temperature, max_tokens=200, extra_body=forced)
    assert [(c["name"], c["arguments"]) for c in calls] == HERMES_CALLS
    assert content == "I will check.\n" and finish_reason == "tool_calls"


async def test_required_with_n_choices_forces_every_choice(client):
    result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                                  n=3, temperature=1.0, seed=5, max_tokens=300)
    assert len(result.choices) == 3
    for choice in result.choices:
        assert choice.finish_reason == "tool_calls" and _validated(choice.message.tool_calls)


async def test_forced_calls_with_beam_search_are_refused_naming_tools(server, http):
    status, payload = await _post(http, server, tools=TOOLS, tool_choice="required", use_beam_search=True, n=2,
                                  max_tokens=20)
    assert status == 400, payload
    assert payload["error"]["param"] == "tools"
