"""scripts/bench_stream_cpu.py end to end with tiny sizes: a server process, an offline process and the client,
every figure with its baseline (the speeds themselves are never asserted)."""
from __future__ import annotations

import json

from tests.server.test_bench_serving import load_script


def test_the_stream_cpu_benchmark_reports_server_and_offline_cpu_per_token_and_the_loop_lag(tiny_model_dir,
                                                                                            tmp_path, capsys):
    bench = load_script("bench_stream_cpu")
    out = tmp_path / "figures.json"
    results = bench.main(["--model", tiny_model_dir("qwen3"), "--endpoint", "both", "--num-streams", "4",
                          "--max-tokens", "6", "--prompt-len", "5", "--rounds", "1", "--warmup-tokens", "2",
                          "--json", str(out)])
    assert json.loads(out.read_text())["endpoints"].keys() == {"completions", "chat"}
    for figures in results["endpoints"].values():
        (served,) = figures["rounds"]
        assert served["tokens"] == 4 * 6 and served["engine_tokens"] >= 4 * 6
        assert served["cpu_s"] > 0 and "loop" in served["threads"]
        assert figures["server_cpu_us_per_token"] > 0 and figures["offline_cpu_us_per_token"] > 0
        assert figures["ratio"] > 0 and figures["server_lag_max_ms"] >= 0
    assert results["offline_rounds"][0]["tokens"] == 4 * 6
    printed = capsys.readouterr().out
    assert printed.count("server CPU per streamed token:") == 2 and printed.count("(offline LLM.generate:") == 4
    assert printed.count("event loop worst lag:") == 2
