"""A draft model in the server (`--speculative-config` with method draft_model), through the official openai
client: the same text streamed and whole as without speculation, and /metrics counting every proposal of
the target-as-its-own-draft as accepted."""
from __future__ import annotations

import json

import aiohttp
import pytest

from tests.server.conftest import MODEL_NAME, live_server, wait_until_idle
from tests.server.test_metrics_and_tools import parse_metrics
from tests.spec_decode.helpers import draft_model_config

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "The capital of France is"


async def _texts(server) -> tuple[str, str]:
    import openai
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x")
    request = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 30, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    whole = (await client.completions.create(**request)).choices[0].text
    stream = await client.completions.create(stream=True, **request)
    streamed = "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])
    await client.close()
    return whole, streamed


async def test_draft_model_through_the_openai_client(tiny_model_dir):
    path = tiny_model_dir("qwen3")
    async with live_server(path) as plain:
        expected, _ = await _texts(plain)
    flag = json.dumps(draft_model_config(path, 3))  # what --speculative-config passes on
    async with live_server(path, speculative_config=flag) as server, aiohttp.ClientSession() as http:
        whole, streamed = await _texts(server)
        await wait_until_idle(server.engine)
        async with http.get(server.url + "/metrics") as response:
            _, samples = parse_metrics(await response.text())
    assert whole == streamed == expected

    def value(name: str) -> float:
        return samples["asyncserve:" + name][0][1]

    assert value("spec_decode_num_draft_tokens_total") > 0
    assert value("spec_decode_num_accepted_tokens_total") == value("spec_decode_num_draft_tokens_total")
