"""Streams are what they were before streaming requests got delta outputs (engine →
sink → SSE frame) and the step's text was decoded in one batch: every chunk of a set of streamed requests
(completions and chat; n > 1, logprobs, echo, stop strings, sampled text with multi-byte characters split
across tokens, special tokens kept, continuous usage; the reasoning and tool-call parsers on the real
model's text and on scripted texts cut inside their tags and inside characters) is compared with the chunks
that main's code (63e723c, cumulative outputs) sent, recorded in data/stream_golden.json: the same bytes but for
logprob floats, compared to 1e-5 (another torch, or another batching of the same requests, rounds the last bits).

Ids, `created` and tool-call ids are random and left out. To record again (only on purpose, from a
checkout whose streams are known good): ASYNCSERVE_WRITE_STREAM_GOLDEN=1 pytest this file.
"""
from __future__ import annotations

import json
import math
import os
import re

import orjson
import pytest
import pytest_asyncio

from tests.server.conftest import MODEL_NAME, live_server
from tests.server.scripted import scripted_output
from tests.server.test_tool_calls import TOOLS

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "stream_golden.json")
_TOOL_ID = re.compile(r"chatcmpl-tool-[0-9a-f]+")

COMPLETIONS = {
    "n2_logprobs_usage": {"prompt": ["Once upon", "The river"], "max_tokens": 24, "temperature": 0, "n": 2,
                          "logprobs": 2, "stream_options": {"include_usage": True,
                                                            "continuous_usage_stats": True}},
    "stop_strings": {"prompt": ["Once upon", "The river"], "max_tokens": 32, "temperature": 0, "n": 2,
                     "logprobs": 1, "stop": ["e", "ou", "the "], "stream_options": {"include_usage": True}},
    "stop_included": {"prompt": "Hello", "max_tokens": 32, "temperature": 0, "stop": ["an", "x"],
                      "include_stop_str_in_output": True},
    "echo_logprobs": {"prompt": "The river", "max_tokens": 8, "temperature": 0, "echo": True, "logprobs": 1},
    "sampled_multibyte": {"prompt": ["日本語の", "Ünïcödé"], "max_tokens": 48, "temperature": 1.3, "seed": 7,
                          "n": 3, "logprobs": 0, "stream_options": {"include_usage": True}},
    "special_tokens_kept": {"prompt": "Hi", "max_tokens": 32, "temperature": 1.0, "seed": 3,
                            "skip_special_tokens": False, "spaces_between_special_tokens": False},
    "stop_token_ids": {"prompt": "Once upon", "max_tokens": 32, "temperature": 0, "logprobs": 1,
                       "stop_token_ids": [66]},  # "`", the greedy output's 4th token
}

CHAT = {
    "n2_top_logprobs_usage": {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 24,
                              "temperature": 0, "n": 2, "logprobs": True, "top_logprobs": 2,
                              "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
    "sampled_multibyte_stop": {"messages": [{"role": "user", "content": "日本語で話して"}], "max_tokens": 48,
                               "temperature": 1.3, "seed": 11, "n": 2, "stop": ["の", "ab"],
                               "stream_options": {"include_usage": True}},
    "reasoning_and_tools_auto": {"messages": [{"role": "user", "content": "What is the weather?"}],
                                 "max_tokens": 32, "temperature": 0, "tools": TOOLS, "tool_choice": "auto",
                                 "stream_options": {"include_usage": True}},
}

# Scripted texts (the engine replaced, the server real): tags and multi-byte characters cut across steps.
SCRIPTED = {
    "think_then_call": ["<th", "ink>Let me", " think… 日本", "</thi", "nk>Sure.<tool_", "call>\n{\"name\": \"get_",
                        "weather\", \"arguments\": {\"city\": \"Pa", "ris\"}}\n</tool_call>"],
    "think_then_answer": ["<think>", "hmm", "</think>", "The an", "swer is 4", "2 ✓"],
}


def _normalized(raw: bytes) -> list:
    frames = [frame[len(b"data: "):] for frame in raw.split(b"\n\n") if frame.startswith(b"data: ")]
    assert frames[-1] == b"[DONE]"
    events = []
    for frame in frames[:-1]:
        event = orjson.loads(_TOOL_ID.sub("chatcmpl-tool-ID", frame.decode()))
        event.pop("id", None)
        event.pop("created", None)
        events.append(event)
    return events


async def _events(http, url: str, body: dict) -> list:
    async with http.post(url, json={"model": MODEL_NAME, **body, "stream": True}) as response:
        assert response.status == 200, await response.text()
        return _normalized(await response.read())


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server(model_path):
    options = {"reasoning_parser": "deepseek_r1", "tool_call_parser": "hermes", "enable_auto_tool_choice": True}
    async with live_server(model_path, app_options=options) as live:
        yield live


async def _all_streams(server, http) -> dict:
    streams = {}
    for name, body in COMPLETIONS.items():
        streams[f"completions/{name}"] = await _events(http, server.api + "/completions", body)
    for name, body in CHAT.items():
        streams[f"chat/{name}"] = await _events(http, server.api + "/chat/completions", body)
    chat = {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": TOOLS, "tool_choice": "auto",
            "stream_options": {"include_usage": True}}
    for name, pieces in SCRIPTED.items():
        with scripted_output(server.engine, pieces):
            streams[f"scripted/{name}"] = await _events(http, server.api + "/chat/completions", chat)
    return streams


@pytest.mark.asyncio(loop_scope="session")
async def test_streams_are_what_they_were_before_delta_outputs(server, http):
    streams = await _all_streams(server, http)
    if os.environ.get("ASYNCSERVE_WRITE_STREAM_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w", encoding="utf-8") as f:
            json.dump(streams, f, ensure_ascii=False, indent=0)
        pytest.skip("recorded " + GOLDEN)
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    assert sorted(streams) == sorted(golden)
    for name in golden:
        assert _same(streams[name], golden[name]), (name, streams[name], golden[name])


def _same(got, want) -> bool:
    """Equal, but for float logprobs within 1e-5 relative: another torch's CPU kernels round differently in
    the last bits (the streams' shape, text and tokens must not change at all)."""
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)
    if isinstance(want, dict) and isinstance(got, dict):
        return got.keys() == want.keys() and all(_same(got[key], want[key]) for key in want)
    if isinstance(want, list) and isinstance(got, list):
        return len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want))
    return type(got) is type(want) and got == want


def test_the_golden_streams_cover_what_they_claim():
    """Multi-byte characters split across tokens (completions' "bytes:" tokens or U+FFFD-free text whose
    tokens outnumber its text steps), stops by string and by token, several choices, reasoning and calls."""
    with open(GOLDEN, encoding="utf-8") as f:
        golden = json.load(f)
    sampled = golden["completions/sampled_multibyte"]
    tokens = [token for event in sampled for choice in event["choices"] if choice["logprobs"]
              for token in choice["logprobs"]["tokens"]]
    assert any(token.startswith("bytes:") for token in tokens)
    reasons = {(choice.get("finish_reason"), choice.get("stop_reason")) for stream in golden.values()
               for event in stream for choice in event["choices"] if choice.get("finish_reason")}
    assert any(reason == "stop" and isinstance(stop, str) for reason, stop in reasons)
    assert any(reason == "stop" and isinstance(stop, int) for reason, stop in reasons)
    assert any(reason == "length" for reason, _ in reasons)
    deltas = [choice["delta"] for name in ("scripted/think_then_call", "chat/reasoning_and_tools_auto")
              for event in golden[name] for choice in event["choices"]]
    assert any("reasoning_content" in delta for delta in deltas)
    assert any("tool_calls" in delta for delta in deltas)
    assert {choice["index"] for event in golden["chat/n2_top_logprobs_usage"] for choice in event["choices"]} == {0, 1}
