"""/health sees a stuck engine: 200 while idle or making progress, 503 `engine_stalled` once the engine has
had work but finished no step for --health-stall-timeout (vLLM's /health stays 200 while its engine hangs)."""
from __future__ import annotations

import asyncio
import threading

import aiohttp
import pytest

from tests.server.conftest import MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_step_stuck_on_the_device_turns_health_503_and_back(model_path):
    release = threading.Event()
    async with live_server(model_path, {"health_stall_timeout": 0.3}) as live, aiohttp.ClientSession() as http:
        async with http.get(f"{live.url}/health") as response:
            assert response.status == 200  # idle
        executor = live.engine.llm_engine.executor
        launch = executor.launch

        def hung_launch(message):  # the step thread blocks, as on a hung device
            release.wait(10)
            return launch(message)

        executor.launch = hung_launch
        request = asyncio.ensure_future(http.post(f"{live.url}/v1/completions",
                                                  json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}))
        await asyncio.sleep(0.6)
        async with http.get(f"{live.url}/health") as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "engine_stalled"
        executor.launch = launch
        release.set()
        async with await request as response:
            assert response.status == 200
        async with http.get(f"{live.url}/health") as response:
            assert response.status == 200
