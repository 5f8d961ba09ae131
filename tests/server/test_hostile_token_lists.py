"""Requests with huge token lists (bad_words, allowed_token_ids, stop_token_ids) hold neither the event loop
nor later steps: words are tokenized once, off the loop, and lists past their bounds get a 400 naming the
field. The lag bound is test_loop_lag.py's, generous for a loaded 2-core machine; before the fix a
150,000-word bad_words list held this machine's loop for 27-32 s."""
from __future__ import annotations

import asyncio
import random
import threading

import aiohttp
import orjson
import pytest

from asyncserve import SamplingParams
from asyncserve.sampling_params import MAX_BAD_WORDS
from tests.server.conftest import MODEL_NAME, live_server
from tests.server.test_loop_lag import MAX_LAG

pytestmark = pytest.mark.asyncio(loop_scope="session")


def _words(count: int) -> list[str]:
    """Distinct made-up words: the tokenizer's word cache cannot make them cheap."""
    rng = random.Random(count)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 10)))
            for _ in range(count)]


async def _post(live, http, body: dict) -> tuple[int, dict, float]:
    data = orjson.dumps(body)
    await asyncio.sleep(0.05)  # the lag monitor reports the test's own work (building the body) first
    live.state.lag.reset()
    async with http.post(live.url + "/v1/completions", data=data,
                         headers={"Content-Type": "application/json"}) as response:
        payload = orjson.loads(await response.read())
    return response.status, payload, live.state.lag.reset()


def _spy_encode(monkeypatch, tokenizer, texts: set[str]) -> list[int]:
    """Records the thread of every `tokenizer.encode` of one of `texts`."""
    threads: list[int] = []
    real_encode = tokenizer.encode

    def encode(text, *args, **kwargs):
        if text.strip() in texts:
            threads.append(threading.get_ident())
        return real_encode(text, *args, **kwargs)

    monkeypatch.setattr(tokenizer, "encode", encode)
    return threads


async def test_more_bad_words_than_the_bound_are_a_400_without_holding_the_loop(model_path):
    async with live_server(model_path, app_options={"max_body_bytes": 8 << 20}) as live, \
            aiohttp.ClientSession() as http:
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "bad_words": _words(150_000)}
        status, payload, lag = await _post(live, http, body)
        assert status == 400 and payload["error"]["param"] == "bad_words"
        assert f"at most {MAX_BAD_WORDS} words" in payload["error"]["message"]
        assert lag < MAX_LAG


async def test_a_big_bad_words_list_is_tokenized_once_off_the_loop(model_path, monkeypatch):
    async with live_server(model_path) as live, aiohttp.ClientSession() as http:
        words = _words(MAX_BAD_WORDS)  # about 30 KB: the body is prepared in the worker thread
        threads = _spy_encode(monkeypatch, live.engine.tokenizer, set(words))
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 8, "bad_words": words}
        status, payload, lag = await _post(live, http, body)
        assert status == 200 and payload["usage"]["completion_tokens"] == 8
        assert threads and threading.get_ident() not in threads
        assert lag < MAX_LAG


async def test_generate_tokenizes_bad_words_off_the_loop(model_path, monkeypatch):
    async with live_server(model_path) as live:
        words = _words(200)
        threads = _spy_encode(monkeypatch, live.engine.tokenizer, set(words))
        params = SamplingParams(temperature=0.0, max_tokens=4, bad_words=words)
        outputs = [output async for output in live.engine.generate("Hello", params)]
        assert len(outputs[-1].outputs[0].token_ids) == 4
        assert threads and threading.get_ident() not in threads
        assert params.token_constraints is None  # prepared on the request's own copy


@pytest.mark.parametrize("field", ["allowed_token_ids", "stop_token_ids"])
async def test_token_id_lists_longer_than_the_vocabulary_are_a_400_naming_the_field(model_path, field):
    async with live_server(model_path) as live, aiohttp.ClientSession() as http:
        vocab_size = live.engine.vocab_size
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, field: [1] * (vocab_size + 1)}
        status, payload, _ = await _post(live, http, body)
        assert status == 400 and payload["error"]["param"] == field
        assert f"at most {vocab_size}" in payload["error"]["message"]
