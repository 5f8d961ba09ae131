"""Speculation in the server: a stream gets a step's accepted tokens in one chunk, the text is the same as
without streaming, and /metrics counts drafts with vLLM's names."""
from __future__ import annotations

import json

import aiohttp
import pytest

from tests.server.conftest import MODEL_NAME, live_server, wait_until_idle
from tests.server.test_metrics_and_tools import parse_metrics
from tests.spec_decode.helpers import NGRAM

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "ab " * 12  # the tiny Qwen3 loops on it, so prompt lookup keeps proposing right tokens


def _events(raw: bytes) -> list[dict]:
    events = [line.removeprefix(b"data: ") for line in raw.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(event) for event in events[:-1]]


async def test_stream_carries_several_tokens_per_chunk_and_metrics_count_them(tiny_model_dir):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    async with live_server(tiny_model_dir("qwen3"), speculative_config=NGRAM) as server, \
            aiohttp.ClientSession() as http:
        async with http.post(server.api + "/completions", json={**body, "stream": True, "logprobs": 0}) as response:
            assert response.status == 200
            chunks = _events(await response.read())
        async with http.post(server.api + "/completions", json=body) as response:
            whole = await response.json()
        await wait_until_idle(server.engine)
        async with http.get(server.url + "/metrics") as response:
            types, samples = parse_metrics(await response.text())
    tokens_per_chunk = [len(chunk["choices"][0]["logprobs"]["tokens"]) for chunk in chunks if chunk["choices"]]
    assert sum(tokens_per_chunk) == 40
    assert max(tokens_per_chunk) > 1  # a verify step's accepted run arrives as one chunk
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"]) == \
        whole["choices"][0]["text"]

    def value(name: str) -> float:
        return samples["asyncserve:" + name][0][1]

    for name in ("spec_decode_num_drafts_total", "spec_decode_num_draft_tokens_total",
                 "spec_decode_num_accepted_tokens_total", "spec_decode_num_accepted_tokens_per_pos_total"):
        assert types["asyncserve:" + name] == "counter"
    assert 0 < value("spec_decode_num_accepted_tokens_total") <= value("spec_decode_num_draft_tokens_total")
    per_position = samples["asyncserve:spec_decode_num_accepted_tokens_per_pos_total"]
    assert [labels.split('position="')[1].rstrip('"') for labels, _ in per_position] == ["0", "1", "2", "3"]
    assert sum(count for _, count in per_position) == value("spec_decode_num_accepted_tokens_total")


async def test_the_periodic_log_says_which_batch_sizes_speculate(tiny_model_dir, caplog):
    """With the governor on (the shipped default), the server's speculation line adds what it measured."""
    import logging
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    async with live_server(tiny_model_dir("qwen3"), speculative_config={**NGRAM, "disable_when_slower": True}) \
            as server, aiohttp.ClientSession() as http:
        async with http.post(server.api + "/completions", json=body) as response:
            assert response.status == 200
        await wait_until_idle(server.engine)
        caplog.set_level(logging.INFO, logger="asyncserve")
        server.engine._log_stats(interval=0.0)
    line = next(record.getMessage() for record in caplog.records
                if record.getMessage().startswith("speculative decoding:"))
    assert "; speculation by batch size: 1 " in line
