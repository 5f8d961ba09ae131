"""GPT-OSS over HTTP with the openai client: the checkpoint's harmony template renders the prompt, and
`--reasoning-parser openai_gptoss --tool-call-parser openai` put the analysis channel in
`reasoning_content`, the final channel in `content` and calls to `functions.NAME` in `tool_calls`,
streamed or not. The engine's text is scripted (`scripted_output`): a random model writes no harmony."""
from __future__ import annotations

import json

import pytest
import pytest_asyncio

from tests.server.conftest import MODEL_NAME, live_server
from tests.server.scripted import scripted_output
from tests.server.test_tool_calls import TOOLS

pytestmark = pytest.mark.asyncio(loop_scope="session")

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ANALYSIS = "<|channel|>analysis<|message|>The user wants the weather. Call the tool.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
        '<|message|>{"city": "Paris", "unit": "C"}')
FINAL = "<|start|>assistant<|channel|>final<|message|>It is sunny in Paris."


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(tiny_model_dir):
    options = {"reasoning_parser": "openai_gptoss", "tool_call_parser": "openai", "enable_auto_tool_choice": True}
    async with live_server(tiny_model_dir("gpt_oss"), app_options=options, max_model_len=2048) as live:
        yield live


def _pieces(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


async def test_the_prompt_is_the_checkpoints_harmony_rendering(server, http):
    async with http.post(server.url + "/tokenize", json={"model": MODEL_NAME, "messages": ASK, "tools": TOOLS}) as r:
        tokens = (await r.json())["tokens"]
    text = server.engine.tokenizer.decode(tokens)
    assert text.startswith("<|start|>system<|message|>")
    assert "namespace functions" in text and "type get_weather" in text
    assert text.endswith("<|start|>user<|message|>What is the weather in Paris?<|end|><|start|>assistant")


@pytest.mark.parametrize("request_fields,level", [
    ({}, "medium"),  # the template's default
    ({"reasoning_effort": "high"}, "high"),  # OpenAI's field, as vLLM passes it to GPT-OSS
    ({"reasoning_effort": "high", "extra_body": {"chat_template_kwargs": {"reasoning_effort": "low"}}}, "low"),
])
async def test_reasoning_effort_reaches_the_harmony_system_message(server, client, request_fields, level):
    prompts = []
    with scripted_output(server.engine, [FINAL], seen_prompts=prompts):
        await client.chat.completions.create(model=MODEL_NAME, messages=ASK, **request_fields)
    text = server.engine.tokenizer.decode(prompts[0]["prompt_token_ids"])
    assert f"Reasoning: {level}" in text and text.count("Reasoning:") == 1


async def test_special_tokens_are_kept_for_the_parsers(server, client):
    seen = []
    with scripted_output(server.engine, [ANALYSIS + FINAL], seen_params=seen):
        await client.chat.completions.create(model=MODEL_NAME, messages=ASK)
    assert seen[0].skip_special_tokens is False


@pytest.mark.parametrize("size", [3, 1000])
async def test_reasoning_and_answer(server, client, size):
    with scripted_output(server.engine, _pieces(ANALYSIS + FINAL, size)):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK)
    message = result.choices[0].message
    assert message.model_extra["reasoning_content"] == "The user wants the weather. Call the tool."
    assert message.content == "It is sunny in Paris."
    assert message.tool_calls is None and result.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("size", [3, 1000])
async def test_a_tool_call_with_its_reasoning(server, client, size):
    with scripted_output(server.engine, _pieces(ANALYSIS + CALL, size)):
        result = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS)
    choice = result.choices[0]
    assert choice.message.model_extra["reasoning_content"] == "The user wants the weather. Call the tool."
    assert choice.message.content is None and choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "C"}


async def test_streamed_reasoning_then_tool_call_deltas(server, client):
    with scripted_output(server.engine, _pieces(ANALYSIS + CALL, 4)):
        stream = await client.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, stream=True)
        reasoning, names, arguments, content, finish_reason = "", [], "", "", None
        async for chunk in stream:
            choice = chunk.choices[0]
            delta = choice.delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
            for call in delta.tool_calls or []:
                if call.function.name:
                    names.append(call.function.name)
                arguments += call.function.arguments or ""
            finish_reason = choice.finish_reason or finish_reason
    assert reasoning == "The user wants the weather. Call the tool."
    assert names == ["get_weather"] and json.loads(arguments) == {"city": "Paris", "unit": "C"}
    assert content == "" and finish_reason == "tool_calls"
