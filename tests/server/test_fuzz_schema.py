"""Fuzzing every endpoint's request schema: any JSON body gets a 2xx or an OpenAI-shaped 4xx, never a 500.

The server runs in a thread of its own (its own event loop), so that hypothesis drives plain blocking
requests. Field values are a mix of plausible values and arbitrary JSON; generation stays a few tokens long
so that the whole run takes seconds. A 500 also fails the test through the server log (conftest).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import threading
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL_NAME, live_server

VOCAB = 768
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=8)


def bodies(required: dict, optional: dict) -> st.SearchStrategy:
    """Plausible bodies (values near and past each field's limits), the same with up to two fields turned
    into arbitrary JSON, and arbitrary JSON."""
    plausible = st.fixed_dictionaries(required, optional=optional)
    names = sorted({*required, *optional})

    @st.composite
    def mutated(draw) -> dict:
        body = draw(plausible)
        for name in draw(st.lists(st.sampled_from(names), max_size=2)):
            body[name] = draw(json_value)
        return body

    return st.one_of(plausible, mutated(), json_value)


small_int = st.integers(-2, 4)
token_id = st.integers(-1, VOCAB)
text = st.text(max_size=30)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"]),
     "content": st.one_of(text, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                         max_size=2), json_value)},
    optional={"name": st.one_of(text, json_value)})
MODEL = st.sampled_from([MODEL_NAME, MODEL_NAME, MODEL_NAME, "other"])
SAMPLING = {
    "n": st.integers(0, 3), "best_of": st.integers(0, 3),
    "temperature": st.floats(-1, 3), "top_p": st.floats(-0.5, 1.5), "top_k": st.integers(-2, 10 ** 6),
    "min_p": st.floats(-0.5, 1.5), "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3), "repetition_penalty": st.floats(-1, 3),
    "seed": st.integers(-(2 ** 64), 2 ** 64), "stop": st.one_of(text, st.lists(text, max_size=3)),
    "stop_token_ids": st.lists(token_id, max_size=3), "ignore_eos": st.booleans(),
    "min_tokens": small_int,
    "logit_bias": st.dictionaries(st.from_regex(r"-?[0-9 _]{1,4}", fullmatch=True), st.floats(-150, 150),
                                  max_size=3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.one_of(st.booleans(), json_value)}),
    "include_stop_str_in_output": st.booleans(), "skip_special_tokens": st.booleans(),
    "user": text, "use_beam_search": st.booleans(), "length_penalty": st.floats(-2, 2),
    "response_format": st.just({"type": "text"}), "prompt_logprobs": small_int,
}
PROMPT = st.one_of(text, st.lists(text, max_size=3), st.lists(token_id, max_size=6),
                   st.lists(st.lists(token_id, max_size=4), max_size=2))
COMPLETION_BODY = bodies(
    {"model": MODEL, "prompt": PROMPT, "max_tokens": st.integers(-1, 4)},
    {**SAMPLING, "echo": st.booleans(), "logprobs": small_int, "suffix": text})
CHAT_BODY = bodies(
    {"model": MODEL, "messages": st.lists(message, max_size=3), "max_tokens": st.integers(-1, 4)},
    {**SAMPLING, "logprobs": st.booleans(), "top_logprobs": small_int, "max_completion_tokens": st.integers(-1, 4),
     "add_generation_prompt": st.booleans(),
     "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "bos_token", "x"]), json_value,
                                             max_size=2)})
TOKENIZE_BODY = st.one_of(
    bodies({"prompt": text}, {"model": st.just(MODEL_NAME), "add_special_tokens": st.booleans(),
                              "return_token_strs": st.booleans()}),
    bodies({"messages": st.lists(message, max_size=3)}, {"add_generation_prompt": st.booleans()}))
DETOKENIZE_BODY = bodies({"tokens": st.lists(token_id, max_size=8)}, {"model": st.just(MODEL_NAME)})


@pytest.fixture(scope="module")
def threaded_server(model_path):
    """A live server on its own event loop in a thread: hypothesis tests stay plain functions."""
    ready: concurrent.futures.Future = concurrent.futures.Future()
    stop = threading.Event()

    async def main() -> None:
        async with live_server(model_path, app_options={"freeze_gc": False}) as live:
            ready.set_result(live)
            while not stop.is_set():
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=lambda: asyncio.new_event_loop().run_until_complete(main()), daemon=True)
    thread.start()
    live = ready.result(timeout=120)
    yield live
    stop.set()
    thread.join(30)


def exchange(live, method: str, path: str, body: bytes | None) -> tuple[int, str, bytes]:
    parts = urlsplit(live.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def assert_2xx_or_openai_4xx(status: int, content_type: str, payload: bytes) -> None:
    assert status < 500, payload
    if status >= 400:
        assert content_type.startswith("application/json"), (status, payload)
        error = orjson.loads(payload)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error" and isinstance(error["message"], str), error
    elif content_type.startswith("text/event-stream"):
        assert payload.endswith(b"data: [DONE]\n\n"), payload[-200:]
    else:
        assert status == 200
        orjson.loads(payload)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(body=COMPLETION_BODY)
def test_fuzzed_completions_bodies(threaded_server, body):
    assert_2xx_or_openai_4xx(*exchange(threaded_server, "POST", "/v1/completions", json.dumps(body).encode()))


@FUZZ
@given(body=CHAT_BODY)
def test_fuzzed_chat_bodies(threaded_server, body):
    assert_2xx_or_openai_4xx(*exchange(threaded_server, "POST", "/v1/chat/completions", json.dumps(body).encode()))


@FUZZ
@given(body=TOKENIZE_BODY)
def test_fuzzed_tokenize_bodies(threaded_server, body):
    assert_2xx_or_openai_4xx(*exchange(threaded_server, "POST", "/tokenize", json.dumps(body).encode()))


@FUZZ
@given(body=DETOKENIZE_BODY)
def test_fuzzed_detokenize_bodies(threaded_server, body):
    assert_2xx_or_openai_4xx(*exchange(threaded_server, "POST", "/detokenize", json.dumps(body).encode()))


@FUZZ
@given(model=st.text(max_size=20), method=st.sampled_from(["GET", "POST", "DELETE"]))
def test_fuzzed_model_routes(threaded_server, model, method):
    from urllib.parse import quote
    for path in ("/v1/models", "/v1/models/" + quote(model, safe="")):
        assert_2xx_or_openai_4xx(*exchange(threaded_server, method, path, None))
