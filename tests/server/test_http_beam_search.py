"""`use_beam_search` (vLLM's extra field) on both endpoints, and AsyncEngine.beam_search itself."""
from __future__ import annotations

import pytest

from asyncserve import BeamSearchParams
from tests.server.conftest import MODEL_NAME, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def offline_beams(make_llm_module):
    llm = make_llm_module("qwen3")
    return llm.beam_search(PROMPT, BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))[0]


@pytest.fixture(scope="module")
def make_llm_module(tiny_model_dir):
    from asyncserve import LLM
    return lambda family: LLM(tiny_model_dir(family), device="cpu", num_gpu_blocks_override=512,
                              max_model_len=512, seed=0)


async def test_completions_beam_search_returns_the_best_beams(http, server, offline_beams):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 6, "n": 2, "best_of": 3,
            "use_beam_search": True, "ignore_eos": True}
    async with http.post(server.api + "/completions", json=body) as response:
        assert response.status == 200
        result = await response.json()
    texts = [choice["text"] for choice in result["choices"]]
    assert texts == [beam.text for beam in offline_beams.sequences[:2]]
    assert result["usage"]["completion_tokens"] == 12
    assert (await wait_until_idle(server.engine))["kv_cache_usage_perc"] == 0.0


async def test_chat_beam_search_answers_with_n_choices(http, server):
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "n": 2,
            "use_beam_search": True}
    async with http.post(server.api + "/chat/completions", json=body) as response:
        assert response.status == 200
        result = await response.json()
    assert [choice["index"] for choice in result["choices"]] == [0, 1]
    assert all(choice["message"]["role"] == "assistant" for choice in result["choices"])


async def test_streamed_beam_search_is_refused(http, server):
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 4, "use_beam_search": True, "stream": True}
    async with http.post(server.api + "/completions", json=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["param"] == "use_beam_search"


async def test_async_engine_beam_search_equals_offline(server, offline_beams):
    result = await server.engine.beam_search(PROMPT, BeamSearchParams(beam_width=3, max_tokens=6,
                                                                      ignore_eos=True))
    assert [beam.tokens for beam in result.sequences] == [beam.tokens for beam in offline_beams.sequences]

