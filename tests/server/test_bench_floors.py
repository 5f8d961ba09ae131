"""The benchmarks' floors for MoE models: a decode step reads only the experts it routes to, and each
token multiplies by its top-k experts only; dense models keep every weight."""
from __future__ import annotations

import pytest

from asyncserve.config import EngineConfig
from asyncserve.models.loader import load_model
from asyncserve.engine.resolve_config import resolve_config
from tests.server.test_bench_serving import load_script


def _model(path):
    return load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32")))


@pytest.fixture(scope="module")
def bench_common():
    return load_script("bench_common")


def test_batch_1_decode_of_an_moe_model_reads_the_top_k_experts(bench_common, tiny_model_dir):
    model = _model(tiny_model_dir("mixtral"))  # 2 layers of 6 experts, top-2
    experts = [layer.mlp.experts for layer in model.layers]
    one_expert = sum(p.numel() * 4 for p in (experts[0].w13_weight, experts[0].w2_weight)) // 6
    everything = bench_common.weight_bytes(model)
    assert bench_common.decode_bytes_per_step(model, 1) == everything - 2 * 4 * one_expert
    # A large batch routes to every expert.
    assert bench_common.decode_bytes_per_step(model, 4096) == everything
    assert bench_common.expected_experts_read(128, 8, 1) == pytest.approx(8)
    assert bench_common.expected_experts_read(8, 2, 2) == pytest.approx(8 * (1 - 0.75 ** 2))


def test_active_params_count_top_k_experts_per_token(bench_common, tiny_model_dir):
    model = _model(tiny_model_dir("qwen3_moe"))  # layer 1 sparse: 8 experts, top-3
    experts = model.layers[1].mlp.experts
    per_expert = (experts.w13_weight.numel() + experts.w2_weight.numel()) // 8
    assert bench_common.active_params(model) == bench_common.num_params(model) - 5 * per_expert


def test_dense_models_read_every_weight(bench_common, tiny_model_dir):
    model = _model(tiny_model_dir("qwen3"))
    assert bench_common.decode_bytes_per_step(model, 1) == bench_common.weight_bytes(model)
    assert bench_common.active_params(model) == bench_common.num_params(model)
