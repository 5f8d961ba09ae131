"""scripts/bench_cpu.py end to end on a tiny checkpoint: every contender runs every batch, alternating,
and asyncserve's greedy tokens are transformers' (the speeds themselves are never asserted)."""
from __future__ import annotations

import json
import sys

from tests.server.test_bench_serving import load_script


def test_the_cpu_benchmark_compares_all_contenders_on_the_same_tokens(tiny_model_dir, tmp_path, monkeypatch,
                                                                     capsys):
    bench_cpu = load_script("bench_cpu")
    out = tmp_path / "figures.json"
    monkeypatch.setattr(sys, "argv", ["bench_cpu.py", "--model", tiny_model_dir("llama"), "--rounds", "2",
                                      "--new-tokens", "5", "--batch-sizes", "1", "3", "--json", str(out)])
    bench_cpu.main()
    figures = json.loads(out.read_text())
    names = ["transformers", "asyncserve_llm", "asyncserve_server_engine"]
    assert sorted(figures["batches"]) == ["1", "3"]
    for batch in figures["batches"].values():
        assert sorted(batch["rates"]) == sorted(names)
        assert all(len(rates) == 2 and min(rates) > 0 for rates in batch["rates"].values())
        assert batch["same_tokens"] == {name: True for name in names}
        assert batch["floor_tok_s"] > 0
    printed = capsys.readouterr().out
    assert printed.count("greedy tokens identical to transformers'") == 4
