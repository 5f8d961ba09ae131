"""FusedMoE's one-token path (kernels/moe_row.py): taken only for one token once start-up timing chose a config,
timed once per expert shape behind ASYNCSERVE_MOE_ONE_ROW, never for quantized experts or on the CPU."""
from __future__ import annotations

import torch

from asyncserve.layers import moe as moe_layer
from asyncserve.layers.moe import FusedMoE


def _layer(num_experts=4, hidden=16, inter=8, top_k=2):
    layer = FusedMoE(num_experts, top_k, hidden, inter, renormalize=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.w13_weight.copy_(torch.randn(layer.w13_weight.shape, generator=gen))
        layer.w2_weight.copy_(torch.randn(layer.w2_weight.shape, generator=gen))
    return layer


def test_one_token_takes_the_two_kernel_path_once_a_config_is_chosen(monkeypatch):
    calls = []
    monkeypatch.setattr(moe_layer, "fused_moe_row_triton",
                        lambda hidden, *args, config=None, **options: calls.append((hidden.shape[0], config))
                        or torch.zeros_like(hidden))
    layer = _layer()
    hidden, logits = torch.randn(3, 16), torch.randn(3, 4)
    expected = layer(hidden[:1], logits[:1])  # no config: the grouped path (its reference on the CPU)
    assert calls == [] and expected.abs().sum() > 0
    layer.one_row_config = ((8, 32, 1), (8, 16, 1))
    layer(hidden[:1], logits[:1])
    layer(hidden, logits)  # three tokens: grouped path
    assert calls == [(1, ((8, 32, 1), (8, 16, 1)))]


def test_start_up_timing_chooses_once_per_shape_and_logs_once(monkeypatch):
    timed = []
    monkeypatch.setattr(moe_layer, "TUNE_ONE_ROW_MOE", True)
    monkeypatch.setattr(moe_layer, "use_triton", lambda tensor: True)  # the timing runs on CUDA experts only
    monkeypatch.setattr(moe_layer, "fastest_one_row_moe",
                        lambda layer, *args: timed.append(layer) or (((16, 256, 4), (16, 256, 4)), 0.05, 0.03))
    layers = [_layer(), _layer(), _layer(num_experts=6)]
    timings = {}
    reports = [layer.tune_single_row_fusions(timings) for layer in layers]
    assert timed == [layers[0], layers[2]]
    assert reports[0] == ["MoE 4 experts top-2, one token: two kernels ((16, 256, 4), (16, 256, 4)) 30.0 us "
                          "(grouped path 50.0 us)"]
    assert reports[1] == [] and len(reports[2]) == 1
    assert all(layer.one_row_config == ((16, 256, 4), (16, 256, 4)) for layer in layers)


def test_nothing_is_timed_with_the_switch_off_or_on_the_cpu(monkeypatch):
    monkeypatch.setattr(moe_layer, "fastest_one_row_moe", lambda *args: (_ for _ in ()).throw(AssertionError))
    layer = _layer()
    assert layer.tune_single_row_fusions({}) == [] and layer.one_row_config is None  # switch off
    monkeypatch.setattr(moe_layer, "TUNE_ONE_ROW_MOE", True)
    assert layer.tune_single_row_fusions({}) == [] and layer.one_row_config is None  # CPU experts
