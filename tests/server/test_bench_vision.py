"""scripts/bench_vision.py runs (on the CPU, with --tiny) and prints one JSON line per workload; the
Qwen2.5-VL-7B model directory it builds has Qwen's vision tokens at their ids and the real image processor."""
from __future__ import annotations

import json

from transformers import AutoImageProcessor, AutoTokenizer

from tests.server.test_bench_serving import load_script


def test_the_7b_model_directory_tokenizes_an_image_prompt_as_qwen_does(tmp_path):
    bench_models = load_script("bench_models")
    path = bench_models.model_dir("qwen2.5-vl-7b", str(tmp_path / "qwen2.5-vl-7b"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.encode("t5 <|vision_start|><|image_pad|><|vision_end|> t9") == [5, 151652, 151655, 151653, 9]
    processed = AutoImageProcessor.from_pretrained(path)(
        images=[load_script("bench_vision").random_image(1024, 768, 0)], return_tensors="pt")
    assert processed["image_grid_thw"].tolist() == [[1, 54, 74]]  # 999 image tokens


def test_tiny_run_prints_both_workloads(tmp_path, capsys):
    load_script("bench_models")
    load_script("bench_vision").main(["--tiny", "--work-dir", str(tmp_path)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [row["workload"] for row in rows] == ["ttft", "throughput"]
    assert rows[0]["ttft_ms"] > 0 and rows[1]["output_tok_per_s"] > 0 and rows[1]["concurrency"] == 4
