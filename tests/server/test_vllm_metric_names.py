"""/metrics carries vLLM's metric names beside ours, with the `model_name` label, parsed by the Prometheus
client's own parser: what a Grafana board or the Gateway API Inference Extension built for vLLM reads."""
from __future__ import annotations

import aiohttp
import pytest

from tests.server.conftest import MODEL_NAME

pytestmark = pytest.mark.asyncio(loop_scope="session")
parser = pytest.importorskip("prometheus_client.parser")

VLLM_FAMILIES = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge", "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter", "vllm:prefix_cache_hits": "counter", "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter", "vllm:num_preemptions": "counter",
    "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram", "vllm:request_decode_time_seconds": "histogram",
    "vllm:iteration_tokens_total": "histogram", "vllm:cache_config_info": "gauge",
    "vllm:request_success": "counter", "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram", "vllm:request_max_num_generation_tokens": "histogram"}


async def _scrape(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(url + "/metrics") as response:
        assert response.status == 200
        return {family.name: family for family in parser.text_string_to_metric_families(await response.text())}


async def test_vllms_names_are_served_and_count_what_ours_count(server, client):
    before = await _scrape(server.url)
    await client.completions.create(model=MODEL_NAME, prompt="Hello there", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    families = await _scrape(server.url)
    for name, kind in VLLM_FAMILIES.items():
        assert name in families and families[name].type == kind, name
        assert all(sample.labels.get("model_name") == MODEL_NAME for sample in families[name].samples
                   if name != "vllm:cache_config_info"), name

    def value(families, name, suffix=""):
        return next(s.value for s in families[name].samples if s.name == name + suffix)

    assert value(families, "vllm:generation_tokens", "_total") - value(before, "vllm:generation_tokens", "_total") == 6
    assert value(families, "vllm:generation_tokens", "_total") == value(families, "asyncserve:generation_tokens",
                                                                         "_total")
    for name in ("vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                 "vllm:request_decode_time_seconds", "vllm:time_to_first_token_seconds"):
        assert value(families, name, "_count") == value(before, name, "_count") + 1, name
    # five gaps after the first of six tokens
    assert value(families, "vllm:inter_token_latency_seconds", "_count") - value(
        before, "vllm:inter_token_latency_seconds", "_count") == 5
    assert value(families, "vllm:iteration_tokens_total", "_count") > value(before, "vllm:iteration_tokens_total",
                                                                          "_count")
    for name in ("vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                 "vllm:request_max_num_generation_tokens"):
        assert value(families, name, "_count") == value(before, name, "_count") + 1, name
    assert value(families, "vllm:request_generation_tokens", "_sum") - value(
        before, "vllm:request_generation_tokens", "_sum") == 6
    assert [(s.labels["finished_reason"], s.value) for s in families["vllm:request_success"].samples] == [
        (s.labels["finished_reason"], s.value) for s in families["asyncserve:request_success"].samples]
    info = families["vllm:cache_config_info"].samples[0].labels
    assert info["block_size"] == "16" and int(info["num_gpu_blocks"]) > 0
