"""An EAGLE-3 head in the server (`--speculative-config` with method eagle3), through the official openai
client: the same text streamed and whole as without speculation, and /metrics counting the proposals."""
from __future__ import annotations

import json

import aiohttp
import pytest

from tests.server.conftest import live_server, wait_until_idle
from tests.server.test_metrics_and_tools import parse_metrics
from tests.spec_decode.eagle3_heads import eagle3_config, random_head
from tests.spec_decode.test_draft_model_server import _texts

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_eagle3_through_the_openai_client(tiny_model_dir, tmp_path):
    path = tiny_model_dir("qwen3")
    async with live_server(path) as plain:
        expected, _ = await _texts(plain)
    flag = json.dumps(eagle3_config(random_head(tmp_path / "head", path), 3))  # what --speculative-config passes on
    async with live_server(path, speculative_config=flag) as server, aiohttp.ClientSession() as http:
        whole, streamed = await _texts(server)
        await wait_until_idle(server.engine)
        async with http.get(server.url + "/metrics") as response:
            _, samples = parse_metrics(await response.text())
    assert whole == streamed == expected
    assert samples["asyncserve:spec_decode_num_draft_tokens_total"][0][1] > 0
    assert samples["asyncserve:spec_decode_num_drafts_total"][0][1] > 0
