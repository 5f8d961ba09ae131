"""What a connection may cost the CLI server: idle ones are closed, and a flood of them never starves real
clients, whether of the connection limit or of file descriptors."""
from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys

import aiohttp
import pytest

from asyncserve.server.listener import ConnectionLimits

from tests.server.listening import LIVENESS_TIMEOUT, cli_server, closed_by_server, get, read_answer
from tests.server.test_cli import _free_port, _wait_healthy

pytestmark = pytest.mark.asyncio(loop_scope="session")

SHORT = ConnectionLimits(keepalive_timeout=0.5)


async def test_by_default_a_connection_that_sends_nothing_is_closed_after_five_seconds(model_path):
    async with cli_server(model_path) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        started = asyncio.get_running_loop().time()
        assert await closed_by_server(reader)
        assert asyncio.get_running_loop().time() - started >= 5.0  # vLLM's (uvicorn's) keep-alive timeout
        writer.close()


async def test_a_request_head_that_never_ends_is_closed_after_the_keep_alive_timeout(model_path):
    async with cli_server(model_path, SHORT) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n")
        assert await closed_by_server(reader)
        writer.close()


async def test_a_kept_alive_connection_is_closed_after_the_keep_alive_timeout(model_path):
    async with cli_server(model_path, SHORT) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(get())
        answer = await read_answer(reader)
        assert answer.status == 200
        writer.write(get())  # kept alive: a second request on the same connection is answered
        assert (await read_answer(reader)).status == 200
        assert await closed_by_server(reader)  # then idle: closed
        writer.close()


async def test_at_the_limit_a_new_connection_replaces_the_oldest_that_sent_nothing(model_path):
    limits = ConnectionLimits(keepalive_timeout=60.0, max_connections=4)
    async with cli_server(model_path, limits) as (host, port):
        idle = [await asyncio.open_connection(host, port) for _ in range(4)]
        extra = await asyncio.open_connection(host, port)
        assert await closed_by_server(idle[0][0])  # the oldest silent one made room
        async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}/v1/models") as response:
            assert response.status == 200  # a real client is served at the limit
        assert await closed_by_server(idle[1][0])
        for reader, writer in idle[2:] + [extra]:  # the others stayed open
            writer.write(get())
            assert (await read_answer(reader)).status == 200
        for _, writer in idle + [extra]:
            writer.close()


async def test_at_the_limit_with_every_connection_in_use_a_new_one_is_closed(model_path):
    limits = ConnectionLimits(keepalive_timeout=60.0, max_connections=3)
    async with cli_server(model_path, limits) as (host, port):
        busy = [await asyncio.open_connection(host, port) for _ in range(3)]
        for _, writer in busy:
            writer.write(b"GET /v1/models HTTP/1.1\r\n")  # a head begun: not silent
        await asyncio.gather(*(writer.drain() for _, writer in busy))
        await asyncio.sleep(0.2)  # the server has read the bytes (so long only to make the test meaningful)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(get())
        assert await closed_by_server(reader)  # refused: no answer, closed
        writer.close()
        for reader, writer in busy:
            writer.write(b"Host: test\r\n\r\n")
            assert (await read_answer(reader)).status == 200
            writer.close()


async def _served(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    try:
        writer.write(get())
        return (await read_answer(reader)).status == 200
    except (ConnectionError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def test_a_burst_of_connections_never_holds_more_than_the_limit(model_path):
    limits = ConnectionLimits(keepalive_timeout=60.0, max_connections=5)
    async with cli_server(model_path, limits) as (host, port):
        burst = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(40)))
        served = await asyncio.gather(*(_served(reader, writer) for reader, writer in burst))
        assert sum(served) == 5


def _open_file_limit(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    return apply


async def test_under_a_low_open_file_limit_an_idle_flood_never_starves_a_real_client(model_path):
    """The issue's case: `ulimit -n 512` and 700 idle sockets made every new client fail (EMFILE on accept).
    Here 256 descriptors and 400 idle sockets, with the keep-alive timeout out of the way (60 s)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncserve.cli", "--model", model_path, "--host", "127.0.0.1", "--port", str(port),
         "--num-gpu-blocks-override", "256", "--timeout-keep-alive", "60", "--disable-log-requests"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_open_file_limit(256),
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    flood = []
    try:
        await _wait_healthy(url, process)
        for _ in range(400):
            flood.append(await asyncio.open_connection("127.0.0.1", port))
        timeout = aiohttp.ClientTimeout(total=LIVENESS_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(3):
                async with http.get(url + "/v1/models", headers={"Connection": "close"}) as response:
                    assert response.status == 200
    finally:
        for _, writer in flood:
            writer.close()
        process.kill()
        _, stderr = process.communicate(timeout=30)
    assert "Traceback" not in stderr.decode()
