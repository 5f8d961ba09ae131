"""scripts/bench_serving.py: vLLM's workload flags, vLLM's statistics under vLLM's names, end to end."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ASYNC = pytest.mark.asyncio(loop_scope="session")

SCRIPTS = pathlib.Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules[name]


VLLM_LINES = ["============ Serving Benchmark Result ============", "Successful requests:",
              "Benchmark duration (s):", "Total input tokens:", "Total generated tokens:",
              "Request throughput (req/s):", "Output token throughput (tok/s):", "Total Token throughput (tok/s):",
              "---------------Time to First Token----------------", "Mean TTFT (ms):", "Median TTFT (ms):",
              "P99 TTFT (ms):", "-----Time per Output Token (excl. 1st token)------", "Mean TPOT (ms):",
              "Median TPOT (ms):", "P99 TPOT (ms):", "---------------Inter-token Latency----------------",
              "Mean ITL (ms):", "Median ITL (ms):", "P99 ITL (ms):", "=" * 50]


@ASYNC
async def test_vllm_flags_against_a_running_server(server, capsys, tmp_path):
    bench = load_script("bench_serving")
    results = await bench.async_main([
        "--host", "127.0.0.1", "--port", server.url.rsplit(":", 1)[1], "--backend", "vllm", "--dataset-name", "random", "--num-prompts", "6",
        "--max-concurrency", "3", "--request-rate", "50", "--random-input-len", "8", "--random-output-len", "8",
        "--ignore-eos", "--seed", "3", "--save-result", "--result-dir", str(tmp_path),
        "--result-filename", "out.json"])
    assert (results["completed"], results["failed"], results["total_output_tokens"]) == (6, 0, 48)
    assert results["total_input_tokens"] == 6 * 8 and results["input_lens"] == [8] * 6
    assert results["max_concurrent_requests"] <= 3
    out = capsys.readouterr().out
    for line in VLLM_LINES:
        assert line in out, line
    block = out[out.index("=" * 12 + " Serving"):]
    assert block.index("Mean TTFT") < block.index("Mean TPOT") < block.index("Mean ITL")
    assert "Max loop lag since start-up (ms):" in block and results["server_loop_lag_max_ms"] is not None
    assert "Max loop lag in this run <= (ms):" in block and results["server_loop_lag_run_bound_ms"] > 0
    saved = json.loads((tmp_path / "out.json").read_text())
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "mean_ttft_ms",
                "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms", "mean_itl_ms",
                "median_itl_ms", "p99_itl_ms", "std_itl_ms", "mean_e2el_ms"):
        assert key in saved, key
    # TPOT as vLLM defines it, per request then averaged; ITL over every gap between chunks (a chunk may hold
    # more than one token where the detokenizer waits for the rest of a character).
    tpots = [(lat - ttft) / (n - 1) for lat, ttft, n in zip(saved["latencies"], saved["ttfts"], saved["output_lens"])]
    assert saved["mean_tpot_ms"] == pytest.approx(sum(tpots) / len(tpots) * 1e3)
    gaps = [gap for itl in saved["itls"] for gap in itl]
    assert gaps and saved["mean_itl_ms"] == pytest.approx(sum(gaps) / len(gaps) * 1e3)
    assert 0 < saved["mean_ttft_ms"] <= saved["mean_e2el_ms"]


@ASYNC
async def test_old_flag_names_and_chat_in_process(model_path, tmp_path):
    bench = load_script("bench_serving")
    out = tmp_path / "results.json"
    results = await bench.async_main(["--serve-tiny", "--serve-model", model_path, "--endpoint", "chat",
                                      "--num-prompts", "4", "--input-len", "6", "--output-len", "5",
                                      "--random-range-ratio", "0.5", "--result-json", str(out)])
    assert (results["completed"], results["failed"], results["backend"]) == (4, 0, "openai-chat")
    assert json.loads(out.read_text())["completed"] == 4
    assert results["server_loop_lag_max_ms"] is not None  # the in-process server's lag


def test_tpot_excludes_single_token_requests_and_averages_per_request():
    bench = load_script("bench_serving")
    args = bench.build_parser().parse_args(["--metric-percentiles", "50,99"])
    results = [bench.RequestResult(ok=True, prompt_len=4, output_tokens=11, ttft=0.1, latency=1.1, itl=[0.1] * 10),
               bench.RequestResult(ok=True, prompt_len=4, output_tokens=3, ttft=0.2, latency=0.8, itl=[0.3, 0.3]),
               bench.RequestResult(ok=True, prompt_len=4, output_tokens=1, ttft=0.5, latency=0.5),
               bench.RequestResult(error="HTTP 500")]
    summary = bench.summarize(args, results, duration=2.0, before={}, after={})
    assert summary["mean_tpot_ms"] == pytest.approx((100 + 300) / 2)  # not total time / total tokens
    assert summary["mean_itl_ms"] == pytest.approx((10 * 0.1 + 2 * 0.3) / 12 * 1e3)
    assert summary["mean_ttft_ms"] == pytest.approx(800 / 3)
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (3, 1, 15)
    assert summary["output_throughput"] == 7.5 and summary["total_token_throughput"] == 13.5
    assert summary["p50_ttft_ms"] == pytest.approx(200) and "p99_itl_ms" in summary


def test_random_workload_matches_vllm_lengths_and_avoids_special_ids(model_path):
    from transformers import AutoTokenizer
    bench = load_script("bench_serving")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    args = bench.build_parser().parse_args(["--num-prompts", "200", "--random-input-len", "10",
                                            "--random-output-len", "7", "--random-range-ratio", "0.5",
                                            "--ignore-eos", "--model", "m"])
    bodies = bench.make_requests(args, tokenizer)
    inputs, outputs = [len(b["prompt"]) for b in bodies], [b["max_tokens"] for b in bodies]
    assert min(inputs) == 5 and max(inputs) == 15  # [floor(10 * 0.5), ceil(10 * 1.5)], both ends reached
    assert min(outputs) == 3 and max(outputs) == 11
    ids = {i for b in bodies for i in b["prompt"]}
    assert all(isinstance(i, int) for i in ids) and not ids & set(tokenizer.all_special_ids)
    assert max(ids) >= 0.9 * len(tokenizer)  # drawn from the whole vocabulary
    assert all(b["ignore_eos"] and b["stream"] and b["model"] == "m" for b in bodies)
    assert bench.make_requests(args, tokenizer) == bodies  # --seed decides


def test_loop_lag_of_the_run_comes_from_the_histogram_difference():
    bench = load_script("bench_serving")
    metric = bench.LAG_METRIC + "_bucket@"
    before = {metric + "0.01": 90, metric + "0.025": 99, metric + "0.05": 100, metric + "+Inf": 100}
    after = {metric + "0.01": 190, metric + "0.025": 201, metric + "0.05": 202, metric + "+Inf": 202}
    assert bench.lag_window_bound_ms(before, after) == 25.0  # the 50 ms lag was before the run
    after[metric + "0.05"] = after[metric + "+Inf"] = 203
    assert bench.lag_window_bound_ms(before, after) == 50.0
    assert bench.lag_window_bound_ms({}, {}) is None
