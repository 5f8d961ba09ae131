"""Overload and shutdown: the waiting bound counts only what truly waits; a draining server answers 503."""
from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from asyncserve import SamplingParams
from asyncserve.errors import QueueFullError
from asyncserve.server import SERVER_STATE, openai_app
from asyncserve.server.run import serve
from tests.conftest import assert_pool_clean
from tests.server.conftest import MODEL_NAME, live_server, make_engine

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_the_waiting_bound_counts_only_requests_beyond_free_running_slots(model_path):
    engine = make_engine(model_path, max_num_seqs=16, max_num_waiting=8)
    await engine.start()
    try:
        params = SamplingParams(max_tokens=4)
        # Added in one go (the engine cannot schedule in between): 16 would start at the next step, 8 wait.
        for i in range(16 + 8):
            engine.add_request([5, 6, 7], params, f"burst-{i}")
        with pytest.raises(QueueFullError, match="8 requests already wait beyond the 16 free running slots"):
            engine.add_request([5, 6, 7], params, "one-too-many")
    finally:
        for i in range(16 + 8):
            engine.abort(f"burst-{i}")
        await engine.stop()
    assert_pool_clean(engine.llm_engine)


async def test_a_burst_that_fits_the_free_running_slots_is_never_refused(model_path):
    async with live_server(model_path, max_num_seqs=16, max_num_waiting=8) as live, \
            aiohttp.ClientSession() as http:
        async def one(i: int) -> int:
            body = {"model": MODEL_NAME, "prompt": f"Burst {i}", "max_tokens": 4, "ignore_eos": True}
            async with http.post(live.api + "/completions", json=body) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(16)))
    assert statuses == [200] * 16


async def test_while_draining_new_requests_get_503_shutting_down_until_the_listener_closes(model_path):
    engine = make_engine(model_path)
    app = openai_app(engine, log_requests=False, drain_timeout=30.0)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    server = asyncio.ensure_future(serve(app, "127.0.0.1", 0, stop=stop, shutdown_timeout=10.0,
                                         on_started=lambda addresses: started.set_result(addresses)))
    host, port = (await asyncio.wait_for(started, 60))[0][:2]
    url = f"http://{host}:{port}"
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL_NAME, "prompt": "Keep going", "max_tokens": 120, "ignore_eos": True, "stream": True}
        in_flight = await http.post(url + "/v1/completions", json=body)
        await in_flight.content.readuntil(b"\n\n")
        stop.set()  # what SIGTERM does
        while not app[SERVER_STATE].draining:
            await asyncio.sleep(0.005)
        async with aiohttp.ClientSession() as fresh:  # a new connection, after shutdown began
            for method, path, json_body in (("POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "Hi"}),
                                            ("GET", "/v1/models", None), ("GET", "/health", None)):
                async with fresh.request(method, url + path, json=json_body) as response:
                    payload = orjson.loads(await response.read())
                    assert response.status == 503, (path, payload)
                error = payload["error"]
                assert error["code"] == "shutting_down" and error["type"] == "server_error"
        rest = await in_flight.content.read()  # the request in flight still finishes
        assert rest.endswith(b"data: [DONE]\n\n") and b'"finish_reason":"length"' in rest
    await asyncio.wait_for(server, 30)
    assert not engine.is_running
    assert_pool_clean(engine.llm_engine)
