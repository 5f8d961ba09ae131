"""tool_choice "required" through the official openai client, from a model that writes control characters
wherever a mask lets it: every call's arguments pass `json.loads` and validate, on both grammar backends.
A schema rule a backend cannot follow is a 400 naming the field, never output that breaks the schema."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest
import pytest_asyncio

from tests.checkpoint_edits import prefer_json_breaking_tokens
from tests.server.chat_templates import HERMES_TOOLS_TEMPLATE
from tests.server.conftest import MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")

PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "code": {"type": "string", "minLength": 2, "maxLength": 4},
                   "note": {"type": "string"},
                   "stops": {"type": "array", "maxItems": 2, "items": {"type": "string", "pattern": "^[ -~]{1,5}$"}}},
    "required": ["city", "code", "note", "stops"], "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PARAMETERS}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def breaking_model(tiny_model_dir, tmp_path_factory) -> str:
    return prefer_json_breaking_tokens(tiny_model_dir("qwen3"), tmp_path_factory.mktemp("json-breaking") / "model")


@pytest_asyncio.fixture(scope="module", loop_scope="session", params=["xgrammar", "guidance"])
async def served(request, breaking_model):
    """(openai client, backend name)."""
    options = {"chat_template": HERMES_TOOLS_TEMPLATE}
    async with live_server(breaking_model, app_options=options, max_model_len=1024,
                           structured_outputs_backend=request.param) as live:
        async with openai.AsyncOpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=120) as client:
            yield client, request.param


async def test_required_tool_calls_have_arguments_strict_parsers_accept(served):
    client, _ = served
    results = await asyncio.gather(*(client.chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=seed, n=4,
        max_tokens=200, parallel_tool_calls=False) for seed in (0, 100)))
    calls = 0
    for choice in (choice for result in results for choice in result.choices):
        assert choice.finish_reason == "tool_calls", choice
        for call in choice.message.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)
            calls += 1
    assert calls == 8


async def test_a_pattern_with_length_bounds_is_followed_or_refused(served):
    client, backend = served
    schema = {"type": "object", "properties": {"word": {"type": "string", "pattern": "^[a-z ]+$", "maxLength": 4}},
              "required": ["word"], "additionalProperties": False}
    request = dict(model=MODEL_NAME, messages=ASK, temperature=1.0, seed=1, n=4, max_tokens=40,
                   extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    if backend == "xgrammar":  # it would drop the length bound
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(**request)
        assert refused.value.body["param"] == "structured_outputs" and "maxLength" in refused.value.body["message"]
        return
    result = await client.chat.completions.create(**request)
    for choice in result.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), schema)
