"""`--reasoning-parser` over HTTP with the openai client: thinking text in `reasoning_content` (and vLLM's
newer `reasoning`), the answer in `content`, streamed as reasoning deltas then content deltas.

Real model runs: the tiny model's own output (deepseek_r1: all reasoning until `</think>`), and outputs a
regex forces into `<think>..</think>..` shape, checked against the raw text /v1/completions gives for the
same seed. Scripted runs (`scripted_output`) pin exact texts and cuts; the server after the engine is real.
"""
from __future__ import annotations

import contextlib
import re

import pytest
import pytest_asyncio

from tests.server.conftest import MODEL_NAME, live_server
from tests.server.scripted import scripted_output
from tests.server.test_tool_calls import TOOLS

pytestmark = pytest.mark.asyncio(loop_scope="session")

ASK = [{"role": "user", "content": "Is 9.11 larger than 9.8?"}]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_path):
    options = {"reasoning_parser": "deepseek_r1", "tool_call_parser": "hermes", "enable_auto_tool_choice": True}
    async with live_server(model_path, app_options=options) as live:
        yield live


@contextlib.contextmanager
def reasoning_parser(server, name: str):
    before = server.state.reasoning_parser
    server.state.reasoning_parser = name
    try:
        yield
    finally:
        server.state.reasoning_parser = before


async def _stream(client, **request) -> tuple[list[tuple[str, str]], str | None]:
    """The stream's (kind, text) deltas in order, and its finish reason."""
    deltas, finish_reason = [], None
    stream = await client.chat.completions.create(model=MODEL_NAME, stream=True, **request)
    async for chunk in stream:
        choice = chunk.choices[0]
        finish_reason = choice.finish_reason or finish_reason
        extra = choice.delta.model_extra or {}
        if extra.get("reasoning_content"):
            assert extra["reasoning"] == extra["reasoning_content"]
            deltas.append(("reasoning", extra["reasoning_content"]))
        if choice.delta.content:
            deltas.append(("content", choice.delta.content))
    return deltas, finish_reason


def _joined(deltas, kind: str) -> str | None:
    return "".join(text for k, text in deltas if k == kind) or None


def _reasoning(message) -> str | None:
    extra = message.model_extra
    assert extra["reasoning"] == extra["reasoning_content"]
    return extra["reasoning_content"]


async def _raw_text(http, server, messages, **request) -> str:
    """What the model writes for this conversation, unparsed: /v1/completions on the rendered prompt."""
    async with http.post(server.url + "/tokenize", json={"model": MODEL_NAME, "messages": messages}) as response:
        tokens = (await response.json())["tokens"]
    async with http.post(server.url + "/v1/completions",
                         json={"model": MODEL_NAME, "prompt": tokens, **request}) as response:
        body = await response.json()
    return body["choices"][0]["text"]


async def test_deepseek_r1_output_without_end_tag_is_all_reasoning(server, client, http):
    for seed in range(4):
        request = dict(temperature=1.0, max_tokens=12, seed=seed)
        raw = await _raw_text(http, server, ASK, **request)
        assert "</think>" not in raw
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, **request)
        message = result.choices[0].message
        assert _reasoning(message) == raw and message.content is None
        deltas, _ = await _stream(client, messages=ASK, **request)
        assert _joined(deltas, "reasoning") == raw and _joined(deltas, "content") is None


THINK_REGEX = r"<think>[a-z ]{2,12}</think>[a-z ]{2,12}"


@pytest.mark.parametrize("parser_name", ["qwen3", "deepseek_r1"])
async def test_forced_think_blocks_split_into_reasoning_and_content(server, client, http, parser_name):
    with reasoning_parser(server, parser_name):
        for seed in range(6):
            request = dict(temperature=1.0, max_tokens=60, seed=seed, structured_outputs={"regex": THINK_REGEX})
            raw = await _raw_text(http, server, ASK, **request)
            thinking, answer = re.fullmatch(r"<think>(.*)</think>(.*)", raw).groups()
            result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK,
                                                          extra_body={"structured_outputs": {"regex": THINK_REGEX}},
                                                          temperature=1.0, max_tokens=60, seed=seed)
            message = result.choices[0].message
            assert (_reasoning(message), message.content) == (thinking, answer)
            deltas, _ = await _stream(client, messages=ASK, temperature=1.0, max_tokens=60, seed=seed,
                                      extra_body={"structured_outputs": {"regex": THINK_REGEX}})
            assert (_joined(deltas, "reasoning"), _joined(deltas, "content")) == (thinking, answer)


QWEN3_TEXT = "<think>\nNine point eight is 9.80.\n</think>\n\n9.8 is larger."


@pytest.mark.parametrize("size", [1, 4, 1000])
async def test_qwen3_streams_reasoning_deltas_then_content_deltas(server, client, size):
    pieces = [QWEN3_TEXT[i:i + size] for i in range(0, len(QWEN3_TEXT), size)]
    with reasoning_parser(server, "qwen3"), scripted_output(server.engine, pieces):
        deltas, finish_reason = await _stream(client, messages=ASK)
    kinds = [kind for kind, _ in deltas]
    assert kinds == sorted(kinds, key=lambda kind: kind == "content")  # every reasoning delta comes first
    assert _joined(deltas, "reasoning") == "\nNine point eight is 9.80.\n"
    assert _joined(deltas, "content") == "\n\n9.8 is larger." and finish_reason == "stop"


async def test_qwen3_with_thinking_disabled_has_no_reasoning(server, client):
    with reasoning_parser(server, "qwen3"), scripted_output(server.engine, [QWEN3_TEXT]):
        result = await client.chat.completions.create(
            model=MODEL_NAME, messages=ASK, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert _reasoning(result.choices[0].message) is None
    assert result.choices[0].message.content == QWEN3_TEXT


async def test_deepseek_r1_prompt_opened_think_block(server, client):
    with scripted_output(server.engine, ["Compare tenths", ": 8 > 1.</th", "ink>9.8"]):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK)
    message = result.choices[0].message
    assert (_reasoning(message), message.content) == ("Compare tenths: 8 > 1.", "9.8")


async def test_tool_calls_are_parsed_from_the_content_only(server, client):
    text = ('I need the weather. <tool_call>{"name": "not_a_call"}</tool_call></think>'
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Lima", "unit": "C"}}</tool_call>')
    with scripted_output(server.engine, [text]):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS)
    choice = result.choices[0]
    assert _reasoning(choice.message) == 'I need the weather. <tool_call>{"name": "not_a_call"}</tool_call>'
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == \
        [("get_weather", '{"city": "Lima", "unit": "C"}')]
    assert choice.message.content is None and choice.finish_reason == "tool_calls"


async def test_without_a_reasoning_parser_the_message_has_no_reasoning_fields(server, client):
    with reasoning_parser(server, None), scripted_output(server.engine, [QWEN3_TEXT]):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK)
    assert result.choices[0].message.content == QWEN3_TEXT
    assert "reasoning_content" not in (result.choices[0].message.model_extra or {})
