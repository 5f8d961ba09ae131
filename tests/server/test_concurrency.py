"""Many clients at once, and clients that leave: every stream completes, every abandoned request is freed."""
from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.server.conftest import MODEL_NAME, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

NUM_CLIENTS = 64
MAX_TOKENS = 24


async def _read_events(response: aiohttp.ClientResponse) -> list:
    """SSE events of a response: parsed JSON payloads, then the string "[DONE]"."""
    events, buffer = [], b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            assert raw.startswith(b"data: ")
            data = raw[len(b"data: "):]
            events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    assert buffer == b""
    return events


def _request(i: int) -> tuple[str, dict]:
    """Even clients use completions, odd ones chat; all ask for one logprob entry per streamed token."""
    common = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i, "stream": True,
              "stream_options": {"include_usage": True}, "ignore_eos": True}
    if i % 2 == 0:
        return "/completions", {**common, "prompt": f"Client {i} says", "logprobs": 0}
    return "/chat/completions", {**common, "messages": [{"role": "user", "content": f"Hi from {i}"}],
                                 "logprobs": True}


def _streamed_tokens(event: dict) -> int:
    count = 0
    for choice in event["choices"]:
        logprobs = choice.get("logprobs")
        if logprobs:
            count += len(logprobs["tokens"]) if "tokens" in logprobs else len(logprobs["content"])
    return count


async def test_64_concurrent_streams_all_complete_with_every_token(server):
    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, int, str, object]:
        path, body = _request(i)
        async with session.post(server.api + path, json=body) as response:
            assert response.status == 200
            events = await _read_events(response)
        assert events[-1] == "[DONE]"
        usage = events[-2]["usage"]
        reasons = [c["finish_reason"] for e in events[:-2] for c in e["choices"] if c["finish_reason"]]
        return sum(_streamed_tokens(e) for e in events[:-1]), usage["completion_tokens"], reasons, i

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        results = await asyncio.gather(*(one(session, i) for i in range(NUM_CLIENTS)))
    for streamed, counted, reasons, i in results:
        assert (streamed, counted, reasons) == (MAX_TOKENS, MAX_TOKENS, ["length"]), f"client {i}"
    assert server.state.metrics.num_internal_errors == 0
    stats = await wait_until_idle(server.engine)
    assert stats["kv_cache_usage_perc"] == 0.0


async def test_clients_leaving_mid_stream_free_their_requests_within_a_second(server):
    engine = server.engine
    generated_before = engine.stats()["generation_tokens_total"]

    async def leave_after_two_chunks(session: aiohttp.ClientSession, i: int) -> None:
        body = {"model": MODEL_NAME, "prompt": f"Leaving client {i}", "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        response = await session.post(server.api + "/completions", json=body)
        seen = b""
        while seen.count(b"\n\n") < 2:
            seen += await response.content.readany()
        assert engine.llm_engine.requests  # this client's 400 tokens are far from done
        response.close()  # drops the connection mid-stream

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(leave_after_two_chunks(session, i) for i in range(8)))
        stats = await wait_until_idle(engine, timeout=1.0)
    assert stats["num_requests_running"] == 0 and stats["num_requests_waiting"] == 0
    assert stats["kv_cache_usage_perc"] == 0.0
    engine.llm_engine.block_pool.check_invariants([])
    assert engine.stats()["generation_tokens_total"] - generated_before < 8 * 400 / 2  # stopped early
    assert server.state.active == set()


async def test_non_streaming_client_leaving_aborts_its_request(server):
    engine = server.engine
    body = {"model": MODEL_NAME, "prompt": "A long answer", "max_tokens": 450, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.post(server.api + "/completions", json=body))
        while not engine.llm_engine.requests:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    stats = await wait_until_idle(engine, timeout=1.0)
    assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0
    engine.llm_engine.block_pool.check_invariants([])


async def test_server_keeps_serving_after_clients_leave(client):
    result = await client.completions.create(model=MODEL_NAME, prompt="Still here", max_tokens=3,
                                             extra_body={"ignore_eos": True})
    assert result.usage.completion_tokens == 3
