"""The app inside another aiohttp app, and shutdown: the engine lives exactly as long as the app."""
from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest
from aiohttp import web
from openai import AsyncOpenAI

from asyncserve.server import openai_app
from tests.conftest import assert_pool_clean
from tests.server.conftest import MODEL_NAME, live_server, make_engine, serve

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_mounted_sub_app_serves_beside_host_routes_and_owns_the_engine(model_path):
    engine = make_engine(model_path)
    app = web.Application()

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"host": "route"})

    app.router.add_get("/hello", hello)
    app.add_subapp("/llm", openai_app(engine, log_requests=False))
    assert not engine.is_running
    async with serve(app) as url:
        assert engine.is_running  # the sub-app's cleanup_ctx ran with the host app's start-up
        async with AsyncOpenAI(base_url=url + "/llm/v1", api_key="unused", max_retries=0) as client:
            assert [m.id for m in (await client.models.list()).data] == [MODEL_NAME]
            result = await client.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                extra_body={"ignore_eos": True})
            assert result.usage.completion_tokens == 4
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/hello") as response:
                assert await response.json() == {"host": "route"}
            async with http.get(url + "/llm/health") as response:
                assert response.status == 200
            async with http.get(url + "/llm/metrics") as response:
                assert "asyncserve:generation_tokens_total" in await response.text()
    assert not engine.is_running  # and its cleanup with the host app's
    assert_pool_clean(engine.llm_engine)


async def _stream(http: aiohttp.ClientSession, url: str, max_tokens: int):
    """Opens a stream and reads its first event; returns the response and a reader of the rest."""
    body = {"model": MODEL_NAME, "prompt": "Keep talking", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    response = await http.post(url + "/v1/completions", json=body)
    assert response.status == 200
    first = await response.content.readuntil(b"\n\n")

    async def rest() -> list:
        data = first + await response.content.read()
        events = [e.removeprefix(b"data: ") for e in data.split(b"\n\n") if e]
        return [e.decode() if e == b"[DONE]" else orjson.loads(e) for e in events]

    return response, rest


async def test_shutdown_lets_short_streams_finish(model_path):
    context = live_server(model_path, app_options={"drain_timeout": 10.0})
    live = await context.__aenter__()
    async with aiohttp.ClientSession() as http:
        _, rest = await _stream(http, live.url, max_tokens=40)
        shutdown = asyncio.ensure_future(context.__aexit__(None, None, None))
        events = await rest()
        await shutdown
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert not live.engine.is_running
    assert_pool_clean(live.engine.llm_engine)


async def test_shutdown_aborts_streams_past_the_drain_timeout_and_ends_them_cleanly(model_path):
    context = live_server(model_path, app_options={"drain_timeout": 0.0})
    live = await context.__aenter__()
    async with aiohttp.ClientSession() as http:
        _, rest = await _stream(http, live.url, max_tokens=450)
        shutdown = asyncio.ensure_future(context.__aexit__(None, None, None))
        events = await rest()
        await asyncio.wait_for(shutdown, 10)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "abort"
    assert not live.engine.is_running
    assert_pool_clean(live.engine.llm_engine)
