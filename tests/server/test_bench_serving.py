"""scripts/bench_serving.py runs end to end, so it cannot rot."""
from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

pytestmark = pytest.mark.asyncio(loop_scope="session")

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "bench_serving.py"


def _load_bench():
    if "bench_serving" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_serving", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_serving"] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["bench_serving"]


async def test_benchmark_against_a_running_server(server, capsys):
    bench = _load_bench()
    results = await bench.async_main(["--base-url", server.url, "--num-prompts", "6", "--max-concurrency", "3",
                                      "--request-rate", "50", "--input-len", "8", "--output-len", "8"])
    assert (results["completed"], results["failed"], results["total_output_tokens"]) == (6, 0, 48)
    assert results["total_prompt_tokens"] == 6 * 8
    assert 0 < results["ttft_s"]["mean"] <= results["e2e_s"]["mean"]
    assert results["tpot_s"]["mean"] > 0 and results["itl_s"]["p99"] > 0
    assert results["server_loop_lag_max_s"] is not None
    assert "output token throughput" in capsys.readouterr().out


async def test_benchmark_serving_in_process_on_chat(model_path, tmp_path):
    bench = _load_bench()
    out = tmp_path / "results.json"
    results = await bench.async_main(["--serve-tiny", "--serve-model", model_path, "--endpoint", "chat",
                                      "--num-prompts", "4", "--input-len", "6", "--output-len", "5",
                                      "--random-range-ratio", "0.5", "--result-json", str(out)])
    assert (results["completed"], results["failed"]) == (4, 0)
    assert out.exists()
