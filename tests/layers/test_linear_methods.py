"""The linear-method seam: the checkpoint's quantization config gives every linear layer its method,
which creates the weight, computes the product, post-processes after loading and owns the one-row
kernel choice."""
from __future__ import annotations

import pytest
import torch

from asyncserve import LLM, SamplingParams
from asyncserve.layers import quantization
from asyncserve.layers.quantization import unquantized
from asyncserve.layers.linear import Linear, LinearBase
from asyncserve.layers.quantization import (LinearMethodBase, QuantizationConfig, UnquantizedConfig,
                                            UnquantizedLinearMethod)
from asyncserve.config import EngineConfig
from asyncserve.models.loader import load_model
from asyncserve.engine.resolve_config import resolve_config
from tests.checkpoint_edits import copy_checkpoint
from tests.conftest import PROMPTS


class CountingMethod(LinearMethodBase):
    """The unquantized method, counting what the layer asks of it."""

    def __init__(self):
        self.inner = UnquantizedLinearMethod()
        self.applied = self.processed = self.tuned = 0

    def create_weights(self, layer, in_features, output_sizes, weight_loader):
        self.inner.create_weights(layer, in_features, output_sizes, weight_loader)

    def apply(self, layer, x, bias):
        self.applied += 1
        return self.inner.apply(layer, x, bias)

    def process_weights_after_loading(self, layer):
        self.processed += 1

    def tune_single_row(self, layer, timings):
        self.tuned += 1


class CountingConfig(QuantizationConfig):
    name = "counting"
    made: list[CountingConfig] = []

    def __init__(self):
        self.methods: dict[str, CountingMethod] = {}
        CountingConfig.made.append(self)

    def get_quant_method(self, layer, prefix):
        self.methods[prefix] = CountingMethod()
        return self.methods[prefix]


@pytest.fixture
def counting(monkeypatch):
    monkeypatch.setitem(quantization.QUANTIZATION_METHODS, "counting", CountingConfig)
    monkeypatch.setattr(CountingConfig, "made", [])
    return CountingConfig.made


@pytest.fixture
def counting_checkpoint(tiny_model_dir, tmp_path):
    """The tiny Llama (its own LM head) declaring the test-only method in config.json."""
    return copy_checkpoint(tiny_model_dir("llama"), tmp_path / "counting",
                           {"quantization_config": {"quant_method": "counting"}})


def _linear_names(num_layers: int) -> set[str]:
    names = {"lm_head"}
    for i in range(num_layers):
        names |= {f"layers.{i}.self_attn.qkv_proj", f"layers.{i}.self_attn.o_proj",
                  f"layers.{i}.mlp.gate_up_proj", f"layers.{i}.mlp.down_proj"}
    return names


def test_every_linear_layer_holds_the_checkpoints_method(counting, counting_checkpoint):
    model = load_model(resolve_config(EngineConfig(counting_checkpoint, device="cpu", dtype="float32")))
    layers = {name: module for name, module in model.named_modules() if isinstance(module, LinearBase)}
    assert set(layers) == _linear_names(2)
    methods = counting[0].methods
    assert set(methods) == set(layers)
    for name, layer in layers.items():
        assert layer.quant_method is methods[name]
        assert methods[name].processed == 1
    model.tune_single_row()  # the runner's one call at start-up reaches every layer's method
    assert [method.tuned for method in methods.values()] == [1] * len(methods)


def test_greedy_output_is_unchanged_through_a_wrapping_method(counting, counting_checkpoint, tiny_model_dir):
    params = SamplingParams(temperature=0.0, max_tokens=12)
    plain = LLM(tiny_model_dir("llama"), device="cpu", num_gpu_blocks_override=256)
    expected = [out.outputs[0].token_ids for out in plain.generate(PROMPTS, params, use_tqdm=False)]
    wrapped = LLM(counting_checkpoint, device="cpu", num_gpu_blocks_override=256)
    got = [out.outputs[0].token_ids for out in wrapped.generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected
    methods = counting[0].methods
    assert set(methods) == _linear_names(2)
    assert all(method.applied > 0 for method in methods.values())


def test_each_layer_gets_its_own_unquantized_method():
    config = UnquantizedConfig()
    first, second = Linear(4, 3, quant_config=config), Linear(4, 3, quant_config=config)
    assert isinstance(first.quant_method, UnquantizedLinearMethod)
    assert first.quant_method is not second.quant_method  # each keeps its own one-row kernel


def test_a_tied_lm_head_stays_unquantized(counting, tiny_model_dir, tmp_path):
    path = copy_checkpoint(tiny_model_dir("qwen3"), tmp_path / "tied",
                           {"quantization_config": {"quant_method": "counting"}})
    model = load_model(resolve_config(EngineConfig(path, device="cpu", dtype="float32")))
    assert type(model.lm_head.quant_method) is UnquantizedLinearMethod
    assert "lm_head" not in counting[0].methods


def test_one_row_takes_the_chosen_kernel_and_more_rows_the_gemm(monkeypatch):
    torch.manual_seed(0)
    layer = Linear(19, 37, bias=True)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    calls = []
    real = unquantized.linear
    monkeypatch.setattr(unquantized, "linear", lambda *args: calls.append(args[3]) or real(*args))
    layer.quant_method.single_row = "mv"
    x = torch.randn(3, 19)
    torch.testing.assert_close(layer(x[:1]), torch.nn.functional.linear(x[:1], layer.weight, layer.bias))
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert calls == ["mv"]
