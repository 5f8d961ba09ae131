"""Requests served over HTTP (streamed, not streamed, dropped mid-stream) leave no engine Request or
Sequence for the cyclic garbage collector: its full collections would stall the event loop."""
from __future__ import annotations

import gc

import aiohttp
import pytest

from tests.engine.test_freed_by_refcount import collector_off_saving_garbage, engine_objects
from tests.server.conftest import MODEL_NAME, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_served_requests_are_freed_without_the_garbage_collector(server, http: aiohttp.ClientSession):
    with collector_off_saving_garbage() as garbage:
        for i in range(4):
            body = {"model": MODEL_NAME, "prompt": f"Request {i}", "max_tokens": 6, "ignore_eos": True,
                    "stream": True, "logprobs": 1}
            async with http.post(server.api + "/completions", json=body) as response:
                assert response.status == 200
                assert (await response.read()).endswith(b"data: [DONE]\n\n")
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "n": 2, "max_tokens": 5}
        async with http.post(server.api + "/chat/completions", json=chat) as response:
            assert response.status == 200
            assert len((await response.json())["choices"]) == 2
        dropped = {"model": MODEL_NAME, "prompt": "Dropped", "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with http.post(server.api + "/completions", json=dropped) as response:
            await response.content.readuntil(b"\n\n")
            response.close()  # the server aborts it
        await wait_until_idle(server.engine)
        last = {"model": MODEL_NAME, "prompt": "Last", "max_tokens": 1}
        async with http.post(server.api + "/completions", json=last) as response:
            assert response.status == 200
        gc.collect()
        assert engine_objects(garbage) == []
