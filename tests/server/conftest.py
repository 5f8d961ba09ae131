"""A live asyncserve HTTP server on 127.0.0.1 (random port) per test module, in the tests' event loop."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from asyncserve import AsyncEngine, EngineConfig
from asyncserve.server import SERVER_STATE, openai_app

MODEL_NAME = "tiny-qwen3"
SERVER_LOGGER = "asyncserve.server"
MAX_MODEL_LEN = 512


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: web.Application
    engine: AsyncEngine

    @property
    def api(self) -> str:
        return self.url + "/v1"

    @property
    def state(self):
        return self.app[SERVER_STATE]


def make_engine(model_path: str, **overrides) -> AsyncEngine:
    config = dict(model=model_path, device="cpu", num_gpu_blocks_override=512, max_model_len=MAX_MODEL_LEN,
                  max_num_seqs=128, served_model_name=MODEL_NAME, seed=0)
    config.update(overrides)
    return AsyncEngine(EngineConfig(**config))


@contextlib.asynccontextmanager
async def serve(app: web.Application):
    """Runs `app` on a free port of 127.0.0.1; cleans up (engine stop included) on exit."""
    # aiohttp's default (no handler cancellation): what an embedding app gets; disconnects must still abort.
    runner = web.AppRunner(app, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def live_server(model_path: str, app_options: dict | None = None, **engine_overrides):
    engine = make_engine(model_path, **engine_overrides)
    app = openai_app(engine, log_requests=False, **(app_options or {}))
    async with serve(app) as url:
        yield LiveServer(url, app, engine)


@pytest.fixture(scope="session")
def model_path(tiny_model_dir) -> str:
    return tiny_model_dir("qwen3")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_path):
    async with live_server(model_path) as live:
        yield live


@pytest_asyncio.fixture(loop_scope="session")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture(loop_scope="session")
async def client(server):
    from openai import AsyncOpenAI
    async with AsyncOpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client


async def wait_until_idle(engine: AsyncEngine, timeout: float = 1.0) -> dict:
    """Polls until no request runs or waits and no KV block is used; returns the last stats."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = engine.stats()
        idle = (stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0
                and stats["kv_cache_usage_perc"] == 0.0 and not engine.llm_engine.requests)
        if idle or asyncio.get_running_loop().time() > deadline:
            return stats
        await asyncio.sleep(0.01)


class _InternalErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("unexpected error answering"):
            self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def fail_on_internal_error(request):
    """Any 500 (an unexpected exception in a handler, logged at ERROR) fails the test that caused it,
    unless the test is marked `expect_internal_error`."""
    handler = _InternalErrors()
    logger = logging.getLogger(SERVER_LOGGER)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
    if handler.messages and request.node.get_closest_marker("expect_internal_error") is None:
        pytest.fail(f"the server answered 500: {handler.messages}")
