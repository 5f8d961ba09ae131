"""A server over two tensor-parallel ranks: the same greedy completion as one process; when a worker
dies, the request in flight ends with an OpenAI-shaped 503, /health turns 503, and no worker is left."""
from __future__ import annotations

import os
import signal

import aiohttp
import psutil
import pytest

from tests.server.conftest import MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _workers() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True)
            if "asyncserve.executor.worker" in " ".join(p.cmdline())]


async def _complete(http: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    body = {"model": MODEL_NAME, "prompt": "the cat sat on", "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    async with http.post(url + "/v1/completions", json=body) as response:
        return response.status, await response.json()


async def test_two_ranks_serve_the_same_tokens_and_fail_cleanly(model_path):
    async with aiohttp.ClientSession() as http:
        async with live_server(model_path, dtype="float32", num_gpu_blocks_override=64) as one:
            status, expected = await _complete(http, one.url)
            assert status == 200
        async with live_server(model_path, dtype="float32", num_gpu_blocks_override=64,
                               tensor_parallel_size=2) as two:
            try:
                status, got = await _complete(http, two.url)
                assert status == 200
                assert got["choices"][0]["text"] == expected["choices"][0]["text"]
                os.kill(next(p.pid for p in _workers() if p.environ().get("RANK") == "1"), signal.SIGKILL)
                status, failed = await _complete(http, two.url)
                assert status == 503 and failed["error"]["code"] == "engine_dead"
                assert "rank 1" in failed["error"]["message"]
                async with http.get(two.url + "/health") as response:
                    assert response.status == 503
                assert _workers() == []
            finally:
                two.engine.shutdown()
