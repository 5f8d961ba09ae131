"""/metrics in Prometheus text format with sane values; /tokenize and /detokenize; /health and /version."""
from __future__ import annotations

import asyncio
import math

import pytest

import asyncserve
from tests.server.conftest import MODEL_NAME, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

GAUGES = ["num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "event_loop_lag_seconds_max"]
COUNTERS = ["prompt_tokens_total", "generation_tokens_total", "prefix_cache_queries_total",
            "prefix_cache_hits_total", "request_success_total"]
HISTOGRAMS = ["time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds",
              "event_loop_lag_seconds"]


def parse_metrics(text: str) -> tuple[dict[str, str], dict[str, list[tuple[str, float]]]]:
    """(metric name -> TYPE, sample name -> [(labels, value)])."""
    types, samples = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.partition("{")
            samples.setdefault(name, []).append((labels.rstrip("}"), float(value)))
    return types, samples


async def test_metrics_expose_every_series_with_sane_values(server, client, http):
    for i in range(3):
        await client.completions.create(model=MODEL_NAME, prompt=f"Metrics {i}", max_tokens=5,
                                        extra_body={"ignore_eos": True})
    await wait_until_idle(server.engine)
    async with http.get(server.url + "/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        types, samples = parse_metrics(await response.text())

    def value(name: str, labels_part: str = "") -> float:
        return next(v for labels, v in samples["asyncserve:" + name] if labels_part in labels)

    for name in GAUGES:
        assert types["asyncserve:" + name] == "gauge"
    for name in COUNTERS:
        assert types["asyncserve:" + name] == "counter"
    for name in HISTOGRAMS:
        assert types["asyncserve:" + name] == "histogram"
        buckets = [v for _, v in samples[f"asyncserve:{name}_bucket"]]
        assert buckets == sorted(buckets)  # cumulative
        assert samples[f"asyncserve:{name}_bucket"][-1][0].endswith('le="+Inf"')
        assert buckets[-1] == value(name + "_count")
    assert all(f'model_name="{MODEL_NAME}"' in labels for name, series in samples.items() for labels, _ in series
               if name != "vllm:cache_config_info")  # vLLM's info gauge: the cache config's labels alone
    assert value("num_requests_running") == 0 and value("num_requests_waiting") == 0
    assert value("kv_cache_usage_perc") == 0.0
    assert value("generation_tokens_total") >= 15
    assert value("prompt_tokens_total") >= 3
    assert value("request_success_total", 'finished_reason="length"') >= 3
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        assert value(name + "_count") >= 3
        assert 0 < value(name + "_sum") < 60
    assert 0 <= value("event_loop_lag_seconds_max") < 1.0
    assert value("event_loop_lag_seconds_count") > 0  # the monitor runs
    assert value("http_internal_errors_total") == 0
    assert not any(math.isnan(v) for series in samples.values() for _, v in series)
    # Where the engine loop's time went, phase by phase of the pipelined step.
    assert value("engine_steps_total") >= 5
    phases = ["schedule", "process", "wait_device", "wait_launch"]
    assert all(types[f"asyncserve:engine_{phase}_seconds_total"] == "counter" for phase in phases)
    assert 0 < sum(value(f"engine_{phase}_seconds_total") for phase in phases) < 60


async def test_kv_cache_usage_is_a_fraction_while_busy(server, http):
    body = {"model": MODEL_NAME, "prompt": "Busy", "max_tokens": 200, "ignore_eos": True}
    task = asyncio.ensure_future(http.post(server.api + "/completions", json=body))
    while not server.engine.llm_engine.requests:
        await asyncio.sleep(0.005)
    async with http.get(server.url + "/metrics") as response:
        _, samples = parse_metrics(await response.text())
    usage = samples["asyncserve:kv_cache_usage_perc"][0][1]
    assert 0.0 < usage <= 1.0
    assert samples["asyncserve:num_requests_running"][0][1] + samples["asyncserve:num_requests_waiting"][0][1] == 1
    (await task).close()


async def test_tokenize_and_detokenize_round_trip(server, http):
    tokenizer = server.engine.tokenizer
    text = "Hello world, naïve café"
    async with http.post(server.url + "/tokenize", json={"model": MODEL_NAME, "prompt": text,
                                                          "return_token_strs": True}) as response:
        tokenized = await response.json()
    assert tokenized["tokens"] == tokenizer.encode(text)
    assert tokenized["count"] == len(tokenized["tokens"])
    assert tokenized["max_model_len"] == server.engine.max_model_len
    assert tokenized["token_strs"] == tokenizer.convert_ids_to_tokens(tokenized["tokens"])
    async with http.post(server.url + "/detokenize", json={"tokens": tokenized["tokens"]}) as response:
        assert await response.json() == {"prompt": text}


async def test_tokenize_messages_uses_the_chat_template(server, http):
    messages = [{"role": "user", "content": "Hi there"}]
    async with http.post(server.url + "/tokenize", json={"messages": messages}) as response:
        tokens = (await response.json())["tokens"]
    assert tokens == server.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                 tokenize=True, return_dict=False)


async def test_health_and_version(server, http):
    async with http.get(server.url + "/health") as response:
        assert response.status == 200
    async with http.get(server.url + "/version") as response:
        assert await response.json() == {"version": asyncserve.__version__}


async def test_engine_logs_prefix_cache_hit_rate(server, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="asyncserve")
    server.engine._log_stats(interval=0.0)
    assert "prefix cache hit rate" in caplog.text
