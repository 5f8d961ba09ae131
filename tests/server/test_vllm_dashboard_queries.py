"""vLLM's own Grafana dashboards work against asyncserve: every panel query they ship (copied into
data/vllm_dashboard_queries.json) returns data from /metrics after some requests, evaluated over two scrapes
as Prometheus would (tests/server/promql_subset.py)."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.server.conftest import MODEL_NAME, wait_until_idle
from tests.server.promql_subset import Scrape, evaluate

pytestmark = pytest.mark.asyncio(loop_scope="session")
parser = pytest.importorskip("prometheus_client.parser")

QUERIES = json.loads((Path(__file__).parent / "data" / "vllm_dashboard_queries.json").read_text())["queries"]
# Queries whose metrics describe what asyncserve does not have, with why: none in these dashboards.
NOT_SERVED: dict[str, str] = {}
# Long enough for whole 16-token KV blocks, so that the second completion finds the first one's in the cache.
PROMPT = "The quick brown fox jumps over the lazy dog, and the dog does not mind at all. " * 6
COMPLETION_TOKENS, CHAT_TOKENS = 8, 6


async def _scrape(http: aiohttp.ClientSession, url: str) -> Scrape:
    async with http.get(url + "/metrics") as response:
        text = await response.text()
    return Scrape.from_families(time.monotonic(), parser.text_string_to_metric_families(text))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def scrapes(server):
    """Scrapes before and after two completions (the second a prefix-cache hit) and one streamed chat."""
    from openai import AsyncOpenAI
    async with aiohttp.ClientSession() as http, AsyncOpenAI(base_url=server.api, api_key="unused",
                                                             max_retries=0) as client:
        before = await _scrape(http, server.url)
        for _ in range(2):
            await client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=COMPLETION_TOKENS,
                                            temperature=0, extra_body={"ignore_eos": True})
        stream = await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": PROMPT}], max_tokens=CHAT_TOKENS,
            temperature=0, stream=True, extra_body={"ignore_eos": True})
        async for _ in stream:
            pass
        await wait_until_idle(server.engine)
        return before, await _scrape(http, server.url)


def _grafana(expr: str, window_seconds: float) -> str:
    """Grafana's substitution: the dashboard's model variables name ours; its windows span both scrapes."""
    window = f"{math.ceil(window_seconds) + 1}s"
    for variable in ("$__rate_interval", "$__range", "$__interval"):
        expr = expr.replace(variable, window)
    return expr.replace("$model_name", MODEL_NAME).replace("$Deployment_id", MODEL_NAME)


def _evaluate(expr: str, scrapes) -> list:
    before, after = scrapes
    return evaluate(_grafana(expr, after.time - before.time), before, after)


def _query_id(query: dict) -> str:
    return f"{Path(query['dashboard']).stem}: {query['panel title']}: {query['expr'][:60]}"


@pytest.mark.parametrize("query", [pytest.param(query, id=_query_id(query)) for query in QUERIES])
async def test_every_dashboard_query_returns_data(scrapes, query):
    if query["expr"] in NOT_SERVED:
        pytest.skip(NOT_SERVED[query["expr"]])
    samples = _evaluate(query["expr"], scrapes)
    assert any(math.isfinite(sample.value) for sample in samples), samples


async def test_the_panels_count_what_was_asked(scrapes):
    def total(expr: str) -> float:
        return sum(sample.value for sample in _evaluate(expr, scrapes))

    window = '{model_name="$model_name"}[$__rate_interval]'
    assert total(f"sum by(finished_reason) (increase(vllm:request_success_total{window}))") == 3
    assert total('increase(vllm:request_success_total{finished_reason="length"}[$__range])') == 3
    assert total(f"increase(vllm:request_generation_tokens_sum{window})") == 2 * COMPLETION_TOKENS + CHAT_TOKENS
    assert total(f"increase(vllm:request_max_num_generation_tokens_sum{window})") == (
        2 * COMPLETION_TOKENS + CHAT_TOKENS)
    assert total('sum by(le) (increase(vllm:request_prompt_tokens_bucket{le="+Inf"}[$__range]))') == 3
    assert total(f"increase(vllm:prefix_cache_hits_total{window})") > 0
