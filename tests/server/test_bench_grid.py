"""scripts/bench_grid.py: the online part end to end on the CPU (an asyncserve subprocess on the tiny shapes),
the comparison with vLLM's figures, and the plan of the GPU run."""
from __future__ import annotations

import json

import pytest

from tests.server.test_bench_serving import load_script


def test_online_part_runs_a_server_subprocess_and_writes_one_json(model_path, tmp_path, capsys):
    grid = load_script("bench_grid")
    out = tmp_path / "grid.json"
    record = grid.main(["--out", str(out), "--only", "online", "--model", model_path, "--online-grid", "1:2,2:4",
                        "--input-len", "8", "--output-len", "4", "--work-dir", str(tmp_path / "work"),
                        "--server-args", "--device cpu --max-model-len 64 --num-gpu-blocks-override 64",
                        "--budget-s", "120"])
    saved = json.loads(out.read_text())
    assert saved["online_c1"]["completed"] == 2 and saved["online_c2"]["completed"] == 4, saved
    assert saved["online_c2"]["total_output_tokens"] == 16 and saved["online_c2"]["total_input_tokens"] == 32
    assert saved["online_c2"]["max_concurrency"] == 2 and "mean_tpot_ms" in saved["online_c2"]
    assert saved["startup"]["startup_s"] > 0 and "online_error" not in saved
    assert "itls" not in saved["online_c1"]  # summaries only: one small file
    rows = {(r["workload"], r["metric"]): r for r in saved["comparison"]}
    c1 = rows["online_c1", "output_throughput"]
    assert c1["vllm"] == 148.5 and c1["ratio"] == pytest.approx(saved["online_c1"]["output_throughput"] / 148.5)
    assert rows["online_c64", "output_throughput"]["asyncserve"] is None  # not in this grid
    assert saved["vllm_source"] == "vLLM 0.26.0, measured 2026-11-24 on H100 (issue 11)"
    assert record["online_c1"] == saved["online_c1"]
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "vLLM 0.26.0" in printed


def test_comparison_ratios_favour_asyncserve_above_one_and_targets_are_judged():
    grid = load_script("bench_grid")
    record = {"online_c64": {"output_throughput": 4278 * 1.2, "mean_tpot_ms": 21.2, "mean_ttft_ms": 555 / 2},
              "latency_llama-3.1-8b": {"ms_per_step": 6.0, "tokens_per_s": 166.0, "fraction_of_floor": 0.9},
              "online_c1": {"mean_tpot_ms": 6.1, "output_throughput": 150.0}}
    rows, targets = grid.compare(record)
    ratio = {(r["workload"], r["metric"]): r["ratio"] for r in rows}
    assert ratio["online_c64", "output_throughput"] == pytest.approx(1.2)
    assert ratio["online_c64", "mean_tpot_ms"] == pytest.approx(0.5)  # twice vLLM's time: half as good
    assert ratio["online_c64", "mean_ttft_ms"] == pytest.approx(2.0)
    assert ratio["offline_throughput", "total_token_throughput"] is None
    met = {(t["workload"], t["metric"]): t["met"] for t in targets}
    assert met["online_c64", "output_throughput"] is True and met["online_c64", "mean_tpot_ms"] is False
    assert met["latency_llama-3.1-8b", "fraction_of_floor"] is True
    assert met["online_c1", "mean_tpot_ms / offline ms_per_step"] is True  # 6.1 / 6.0 <= 1.03
    assert met["offline_throughput", "total_token_throughput"] is None


def test_dry_run_plans_the_issue_workloads_with_vllm_flags(tmp_path):
    grid = load_script("bench_grid")
    out = tmp_path / "plan.json"
    record = grid.main(["--out", str(out), "--dry-run", "--work-dir", str(tmp_path)])
    runs = record["plan"]["online"]["runs"]
    assert [(r[r.index("--max-concurrency") + 1], r[r.index("--num-prompts") + 1]) for r in runs] == \
        [("1", "16"), ("64", "256"), ("256", "1024")]
    for run in runs:
        for flag in ("--random-input-len", "512", "--random-output-len", "128", "--ignore-eos", "--dataset-name"):
            assert flag in run
    assert "--load-format" in record["plan"]["online"]["server"]
    assert {"offline", "latency"} <= set(record["plan"]) and json.loads(out.read_text())["plan"] == record["plan"]


def test_a_failing_part_is_recorded_and_the_next_part_still_runs(model_path, tmp_path):
    grid = load_script("bench_grid")
    out = tmp_path / "grid.json"
    grid.main(["--out", str(out), "--only", "online", "--only", "offline", "--model", model_path,
               "--server-args", "--device no-such-device", "--work-dir", str(tmp_path / "work"), "--budget-s", "120"])
    saved = json.loads(out.read_text())
    assert "before it was ready" in saved["online_error"]
    assert "online_c1" not in saved
    # The offline part ran after it (and fails here: there is no CUDA).
    assert saved["offline_throughput"]["error"].startswith("exit status") and saved["offline_throughput"]["log_tail"]
    assert saved["logs"]["offline_throughput"].endswith("offline_throughput.log")
