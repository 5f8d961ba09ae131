"""Streamed steps written from the engine's step (server/stream_sink.py): the same content as a non-streamed
answer, one write per step without waking the client's coroutine, a slow reader's frames kept for its own
coroutine, and every request prepared off the loop."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from urllib.parse import urlsplit

import orjson
import pytest

from asyncserve.outputs import CompletionOutput, RequestOutput
from asyncserve.server import openai_app
from asyncserve.server.stream_sink import HIGH_WATER, StreamSink
from tests.server.conftest import MODEL_NAME, make_engine, serve, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _stream_events(http, url: str, body: dict) -> list[dict]:
    async with http.post(url, json={**body, "stream": True}) as response:
        assert response.status == 200
        raw = await response.read()
    frames = [frame[len(b"data: "):] for frame in raw.split(b"\n\n") if frame.startswith(b"data: ")]
    assert frames[-1] == b"[DONE]"
    return [orjson.loads(frame) for frame in frames[:-1]]


def _joined_completions(events: list[dict]) -> dict[int, dict]:
    choices: dict[int, dict] = {}
    for event in events:
        for choice in event["choices"]:
            joined = choices.setdefault(choice["index"], {"text": "", "tokens": [], "finish_reason": None})
            joined["text"] += choice["text"]
            if choice["logprobs"] is not None:
                joined["tokens"] += choice["logprobs"]["tokens"]
            if choice["finish_reason"] is not None:
                joined["finish_reason"] = choice["finish_reason"]
                joined["stop_reason"] = choice["stop_reason"]
    return choices


async def test_streamed_completions_carry_the_non_streamed_text_logprobs_stop_and_usage(server, http):
    url = server.api + "/completions"
    body = {"model": MODEL_NAME, "prompt": ["Once upon", "The river"], "max_tokens": 24, "temperature": 0,
            "n": 2, "logprobs": 2}
    async with http.post(url, json=body) as response:
        plain = await response.json()
    stop = plain["choices"][0]["text"][6:9]  # cut the first prompt's output in its middle
    body["stop"] = [stop]
    async with http.post(url, json=body) as response:
        whole = await response.json()
    events = await _stream_events(http, url, {**body, "stream_options": {"include_usage": True}})
    streamed = _joined_completions(events)
    assert sorted(streamed) == [0, 1, 2, 3]
    for choice in whole["choices"]:
        got = streamed[choice["index"]]
        assert got["text"] == choice["text"]
        assert got["tokens"] == choice["logprobs"]["tokens"]
        assert (got["finish_reason"], got["stop_reason"]) == (choice["finish_reason"], choice["stop_reason"])
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["choices"][0]["stop_reason"] == stop
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


async def test_streamed_chat_carries_the_non_streamed_messages_and_usage(server, http):
    url = server.api + "/chat/completions"
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 20,
            "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 1}
    async with http.post(url, json=body) as response:
        whole = await response.json()
    events = await _stream_events(http, url, {**body, "stream_options": {"include_usage": True}})
    contents: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    finish: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            contents[choice["index"]] = contents.get(choice["index"], "") + choice["delta"].get("content", "")
            if choice["logprobs"] is not None:
                tokens.setdefault(choice["index"], []).extend(entry["token"] for entry in choice["logprobs"]["content"])
            if choice["finish_reason"] is not None:
                finish[choice["index"]] = choice["finish_reason"]
    for choice in whole["choices"]:
        assert contents[choice["index"]] == choice["message"]["content"]
        assert tokens[choice["index"]] == [entry["token"] for entry in choice["logprobs"]["content"]]
        assert finish[choice["index"]] == choice["finish_reason"]
    assert events[-1]["usage"] == whole["usage"]


async def test_a_fast_client_is_written_by_the_step_without_waking_its_coroutine_per_token(server, http,
                                                                                          monkeypatch):
    wakes = []
    original = StreamSink.wait

    async def counting_wait(self):
        frames = await original(self)
        wakes.append(len(frames))
        return frames

    monkeypatch.setattr(StreamSink, "wait", counting_wait)
    events = await _stream_events(http, server.api + "/completions",
                                  {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 40, "ignore_eos": True,
                                   "temperature": 0})
    assert len(events) >= 10  # many steps reached the client...
    assert len(wakes) <= 3  # ...while its coroutine woke for the first frames and the end only


class _FakeTransport:
    def __init__(self):
        self.written: list[bytes] = []
        self.backlog = 0

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self.backlog

    def write(self, data: bytes) -> None:
        self.written.append(data)


class _OneChunkWriter:
    def step_frame(self, batch) -> bytes:
        return b"".join(f"data: {output.outputs[0].text}\n\n".encode() for _, output in batch)


def _output(text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [1], [CompletionOutput(0, text, [2], finish_reason="stop" if finished else None)],
                         finished)


async def test_past_the_high_water_mark_frames_wait_in_order_for_the_clients_coroutine():
    sink = StreamSink(_OneChunkWriter(), lambda batch: None)
    engine_side = sink.for_prompt(0)
    transport = _FakeTransport()
    sink._transport = transport  # as start() sets it once the headers are out
    engine_side.put(_output("a"))
    engine_side.end_step()
    assert transport.written == [b"9\r\ndata: a\n\n\r\n"]  # one chunk, written by the step itself
    transport.backlog = HIGH_WATER + 1  # the client stopped reading
    for text in ("b", "c"):
        engine_side.put(_output(text))
        engine_side.end_step()
    assert len(transport.written) == 1
    assert await sink.wait() == b"data: b\n\ndata: c\n\n"  # for the coroutine to write, with backpressure
    engine_side.put(_output("d", finished=True))
    engine_side.end_step()  # behind what the coroutine is writing, not beside it
    assert len(transport.written) == 1
    sink.written()
    assert await sink.wait() == b"data: d\n\n"
    sink.written()
    assert sink.finished


async def _connect_never_reading(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (parts.hostname, parts.port))
    return sock


async def _small_send_buffer(request, response) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def test_a_client_that_stops_reading_does_not_hold_up_another_clients_stream(model_path, http):
    engine = make_engine(model_path)
    app = openai_app(engine, log_requests=False, stream_write_timeout=60.0)
    app.on_response_prepare.append(_small_send_buffer)
    async with serve(app) as url:
        body = orjson.dumps({"model": MODEL_NAME, "prompt": "Talk", "max_tokens": 400, "n": 4, "logprobs": 20,
                             "ignore_eos": True, "stream": True})
        slow = await _connect_never_reading(url)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(slow, b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: "
                                          b"application/json\r\nContent-Length: " + str(len(body)).encode()
                                    + b"\r\n\r\n" + body)
            while not engine.llm_engine.requests:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            events = await _stream_events(http, url + "/v1/completions",
                                          {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 32,
                                           "ignore_eos": True})
            elapsed = time.monotonic() - started
            assert _joined_completions(events)[0]["finish_reason"] == "length"
            assert elapsed < 20  # not held until the slow client's 60 s write timeout
            assert engine.llm_engine.requests  # the slow client's request is still being served
        finally:
            slow.close()
        stats = await wait_until_idle(engine, timeout=30.0)
        assert stats["num_requests_running"] == 0 and stats["kv_cache_usage_perc"] == 0.0


async def test_a_small_request_is_parsed_and_tokenized_off_the_loop(server, http, monkeypatch):
    encoder = server.state.prompt_encoder
    threads = []
    original = encoder.encode

    def recording_encode(*args, **kwargs):
        threads.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "encode", recording_encode)
    async with http.post(server.api + "/completions", json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2}
                         ) as response:
        assert response.status == 200
    assert threads and all(thread is not threading.main_thread() for thread in threads)
