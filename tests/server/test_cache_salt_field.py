"""vLLM's `cache_salt` request field: blocks cached under one salt are found only by requests of that salt."""
from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import PROMPTS
from tests.server.conftest import MODEL_NAME, live_server

PROMPT = PROMPTS[1] * 3  # several full blocks


@pytest.mark.asyncio(loop_scope="session")
async def test_the_server_takes_vllms_cache_salt_field(model_path):
    async with live_server(model_path) as live, aiohttp.ClientSession() as http:
        pool = live.engine.llm_engine.block_pool

        async def complete(**extra):
            hits = pool.num_cache_hits
            async with http.post(f"{live.url}/v1/completions",
                                 json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2, **extra}) as response:
                assert response.status == 200, await response.text()
            return pool.num_cache_hits - hits

        assert await complete(cache_salt="a") == 0
        assert await complete(cache_salt="b") == 0
        assert await complete(cache_salt="a") > 0
        async with http.post(f"{live.url}/v1/completions",
                             json={"model": MODEL_NAME, "prompt": PROMPT, "cache_salt": ""}) as response:
            assert response.status == 400 and (await response.json())["error"]["param"] == "cache_salt"
