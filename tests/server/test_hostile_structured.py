"""Hostile structured-output requests get a clear 4xx and never hold anyone else up: a constraint too long
to compile, one that compiles past the deadline, a client that leaves while its grammar compiles, a grammar
that matches nothing, contradictory constraints, JSON nested too deep, a beam wider than max_logprobs.

A slow compile is simulated by holding the backend's compile on an event until the test lets it go: what a
40,000-string enum looks like from Python, without spending minutes of CPU."""
from __future__ import annotations

import asyncio
import contextlib
import threading

import aiohttp
import pytest
import pytest_asyncio

from tests.server.conftest import MODEL_NAME, live_server

pytestmark = pytest.mark.asyncio(loop_scope="session")

COMPILE_TIMEOUT = 1.0
MAX_JSON_DEPTH = 32  # asyncserve.sampling_params.MAX_JSON_DEPTH
HELD = "HELD"  # a regex, or the title of a schema, whose compile waits for the test's release
HELD_SCHEMA = {"title": HELD, "type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(300)}}


class HeldCompiles:
    """Holds the compile of constraints that mention HELD until released; counts what started."""

    def __init__(self, backend):
        self.release = threading.Event()
        self.started = 0
        self._compile = backend.compile
        backend.compile = self

    def __call__(self, params):
        if HELD in str(params.key()[1]):
            self.started += 1
            self.release.wait(30)
        return self._compile(params)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def live(model_path):
    async with live_server(model_path, structured_outputs_compile_timeout=COMPILE_TIMEOUT) as server:
        yield server


@pytest_asyncio.fixture(loop_scope="session")
async def held(live):
    manager = live.engine.llm_engine.structured
    holder = HeldCompiles(manager.backend)
    yield holder
    holder.release.set()
    manager.backend.compile = holder._compile
    await _until(lambda: manager._lanes.num_abandoned_running == 0)


async def _until(condition, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


async def _post(live, path: str, body: dict, seconds: float = 30.0) -> tuple[int, dict]:
    async def post() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as http:
            async with http.post(live.url + path, json={"model": MODEL_NAME, **body}) as response:
                return response.status, await response.json()

    return await asyncio.wait_for(post(), seconds)


async def test_a_constraint_longer_than_the_limit_is_a_400_naming_its_field(live):
    enum = [f"value number {i}" for i in range(40_000)]  # 800 KB: compiled for minutes before
    status, body = await _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                         "guided_json": {"enum": enum}})
    assert status == 400 and body["error"]["param"] == "guided_json"
    assert "this server compiles constraints of at most 65536 (--structured-outputs-max-bytes)" in \
        body["error"]["message"]


async def test_a_grammar_that_does_not_compile_in_time_is_a_400(live, held):
    status, body = await _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "guided_regex": HELD})
    assert status == 400 and body["error"]["param"] == "guided_regex"
    assert f"did not compile within {COMPILE_TIMEOUT:g} s (--structured-outputs-compile-timeout)" in \
        body["error"]["message"]


async def test_a_small_choice_is_answered_while_a_big_schema_compiles(live, held):
    big = asyncio.ensure_future(_post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                                "structured_outputs": {"json": HELD_SCHEMA}}))
    await _until(lambda: held.started == 1)
    status, body = await _post(live, "/v1/completions", {"prompt": "Q:", "max_tokens": 5, "seed": 0,
                                                         "guided_choice": ["yes", "no"]}, seconds=COMPILE_TIMEOUT)
    assert status == 200 and body["choices"][0]["text"] in ("yes", "no")
    assert not big.done()
    held.release.set()
    await big


async def test_a_client_that_leaves_while_its_grammar_compiles_drops_the_compile(live, held):
    manager = live.engine.llm_engine.structured
    leaving = asyncio.ensure_future(_post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                                    "guided_regex": HELD}))
    await _until(lambda: held.started == 1)
    leaving.cancel()  # closes the connection
    with contextlib.suppress(asyncio.CancelledError):
        await leaving
    await _until(lambda: manager._lanes.num_abandoned_running == 1, seconds=COMPILE_TIMEOUT / 2)
    held.release.set()
    await _until(lambda: manager._lanes.num_abandoned_running == 0)
    assert manager._cached(("regex", HELD, False, False)) is None  # its result was dropped


async def test_a_grammar_whose_language_is_empty_is_a_400(live):
    status, body = await _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 5,
                                                         "guided_grammar": "root ::= root"})
    assert status == 400 and body["error"]["param"] == "guided_grammar"
    assert "no output can satisfy it" in body["error"]["message"]


async def test_a_choice_with_allowed_token_ids_is_refused(live):
    status, body = await _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 5,
                                                         "guided_choice": ["yes", "no"], "allowed_token_ids": [5]})
    assert status == 400 and body["error"]["param"] == "allowed_token_ids"
    assert "cannot be combined with structured outputs" in body["error"]["message"]


async def test_beam_search_wider_than_max_logprobs_allows_names_the_beam_width(live):
    status, body = await _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 2, "n": 64,
                                                         "use_beam_search": True})
    assert status == 400 and body["error"]["param"] == "n"
    assert body["error"]["message"].startswith("Beam search with n=64 ranks the 128 most likely next tokens")
    assert "use a beam width of at most 10" in body["error"]["message"]


def _nested(depth: int, leaf):
    value = leaf
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _nested_list(depth: int):
    value = ["x"]
    for _ in range(depth - 1):
        value = [value]
    return value


DEEP = 600  # well under orjson's 1,024, enough for Python's recursion limit before


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"guided_json": _nested(DEEP, {})}, "guided_json"),
    ("/v1/completions", {"response_format": {"type": "json_schema",
                                             "json_schema": {"name": "x", "schema": _nested(DEEP, {})}}},
     "response_format"),
    ("/v1/completions", {"structured_outputs": {"json": _nested(DEEP, {})}}, "structured_outputs"),
    ("/v1/completions", {"guided_choice": _nested_list(DEEP)}, "guided_choice"),
    ("/v1/chat/completions", {"chat_template_kwargs": {"k": _nested(DEEP, 1)}}, "chat_template_kwargs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": _nested(DEEP, {})}}}}],
        "tool_choice": "required"}, "tools"),
])
async def test_json_nested_too_deep_is_a_400_naming_its_field(live, path, body, param):
    body = {"prompt": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    if path == "/v1/completions":
        del body["messages"]
    else:
        del body["prompt"]
    status, payload = await _post(live, path, body)
    assert status == 400 and payload["error"]["param"] == param
    assert f"nests deeper than {MAX_JSON_DEPTH} levels" in payload["error"]["message"]


async def test_json_at_the_depth_limit_is_served(live):
    schema = _nested(MAX_JSON_DEPTH - 2, {"type": "boolean"})  # in the body: guided_json (1) holds it
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
              "additionalProperties": False, "$comment": schema}
    status, body = await _post(live, "/v1/completions", {"prompt": "x", "max_tokens": 30, "seed": 0,
                                                         "guided_json": schema})
    assert status == 200, body


async def test_a_forced_tool_call_with_allowed_token_ids_is_refused(live):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, body = await _post(live, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                              "tools": tools, "tool_choice": "required",
                                                              "allowed_token_ids": [5], "max_tokens": 5})
    assert status == 400 and body["error"]["param"] == "allowed_token_ids"
