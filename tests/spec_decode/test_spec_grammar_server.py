"""Structured outputs with speculation on, through the official openai client: response_format json_schema
gives, whole and streamed, the documents the server gives without speculation (greedy, several requests at
once beside an unconstrained one), which validate; n-gram and draft-model servers propose drafts for them."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import jsonschema
import pytest

from tests.server.conftest import MODEL_NAME, live_server, wait_until_idle
from tests.server.test_metrics_and_tools import parse_metrics
from tests.spec_decode.helpers import NGRAM, draft_model_config

pytestmark = pytest.mark.asyncio(loop_scope="session")

# response_format allows free whitespace, which the random model writes at length: for these prompts it ends.
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "flag", "schema": SCHEMA, "strict": True}}
PROMPTS = ["Describe a person as JSON.", "JSON:", "Hello"]


async def _answers(server) -> list[tuple[str, str]]:
    """(whole, streamed) per prompt, then the unconstrained answer, all requests at once."""
    import openai
    client = openai.AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)

    async def ask(prompt: str, constrained: bool = True) -> tuple[str, str]:
        request = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 200,
                   "temperature": 0}
        if constrained:
            request["response_format"] = RESPONSE_FORMAT
        result = await client.chat.completions.create(**request)
        stream = await client.chat.completions.create(stream=True, **request)
        streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
        if constrained:
            assert result.choices[0].finish_reason == "stop", result.choices[0].message.content
        return result.choices[0].message.content, streamed

    answers = await asyncio.gather(*[ask(prompt) for prompt in PROMPTS], ask("ab " * 12, constrained=False))
    await client.close()
    return answers


async def _draft_tokens(server) -> float:
    await wait_until_idle(server.engine)
    async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as response:
        _, samples = parse_metrics(await response.text())
    return samples["asyncserve:spec_decode_num_draft_tokens_total"][0][1]


async def test_response_format_json_schema_with_speculation(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    async with live_server(path) as plain:
        expected = await _answers(plain)
    for whole, streamed in expected[:-1]:
        jsonschema.validate(json.loads(whole), SCHEMA)
        assert streamed == whole
    for config in (NGRAM, draft_model_config(path, 3)):
        async with live_server(path, speculative_config=json.dumps(config)) as server:
            assert await _answers(server) == expected, config["method"]
            assert await _draft_tokens(server) > 0
