"""On the CPU, start-up keeps each weight shape in the layout whose one-row product was timed faster:
the same values to every reader (a tied embedding included), only the strides change."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from asyncserve import SamplingParams
from asyncserve.layers import cpu_layout
from asyncserve.layers.linear import Linear, tune_single_row_products
from asyncserve.layers.quantization import unquantized
from asyncserve.models.base import CausalLM
from asyncserve.testing.tiny_model import FAMILIES
from tests.conftest import PROMPTS, hf_greedy

# Linear(512, 1024) in float32 holds 2 MiB: over cpu_layout.MIN_TIMED_BYTES, so it is timed.
IN, OUT = 512, 1024


class Stack(nn.Module):
    """Two layers of one shape, one of another, and an LM head tied to an embedding."""

    def __init__(self):
        super().__init__()
        self.first, self.second = Linear(IN, OUT), Linear(IN, OUT)
        self.down = Linear(OUT, IN)
        self.embed_tokens = nn.Embedding(2048, IN)
        self.lm_head = Linear(IN, 2048, shared_weight=self.embed_tokens.weight)
        for parameter in self.parameters():
            parameter.data.normal_()


@pytest.fixture
def timed(monkeypatch):
    """Fake timings by weight shape (row-major ms, column-major ms); records which shapes were timed."""
    shapes = []
    table = {(OUT, IN): (1.0, 0.6), (IN, OUT): (1.0, 0.95), (2048, IN): (2.0, 1.0)}

    class FakeTimer:
        def __call__(self, weight):
            shapes.append(tuple(weight.shape))
            return table[tuple(weight.shape)]

    monkeypatch.setattr(unquantized, "OneRowTimer", FakeTimer)
    return shapes


def test_the_faster_layout_is_kept_for_every_weight_of_a_shape(timed):
    torch.manual_seed(0)
    model = Stack()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tune_single_row_products(model)
    assert sorted(timed) == [(IN, OUT), (OUT, IN), (2048, IN)]  # each shape once
    assert model.first.weight.stride() == model.second.weight.stride() == (1, OUT)  # column-major
    assert model.down.weight.stride() == (OUT, 1)  # 5% faster is not enough: as loaded
    assert model.embed_tokens.weight.stride() == (1, 2048)  # the tied head's layout is the embedding's
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name])
    ids = torch.tensor([3, 2047, 0])
    assert torch.equal(model.embed_tokens(ids), before["embed_tokens.weight"][ids])
    x = torch.randn(5, IN)
    for rows in (x[:1], x):  # sums of 512 products near 20 in size: other summation orders, fp32 rounding
        torch.testing.assert_close(model.first(rows), rows @ before["first.weight"].t(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(model.lm_head(rows), rows @ before["embed_tokens.weight"].t(),
                                   atol=1e-4, rtol=1e-5)


def test_tuning_twice_changes_nothing(timed):
    model = Stack()
    tune_single_row_products(model)
    storage = model.first.weight.data_ptr()
    tune_single_row_products(model)
    assert model.first.weight.data_ptr() == storage


def test_weights_under_a_mebibyte_are_not_timed(timed):
    layer = Linear(64, 128)
    tune_single_row_products(layer)
    assert timed == []
    assert layer.weight.is_contiguous()


def test_the_timer_multiplies_copies_in_both_layouts_from_one_scratch_buffer():
    timer = cpu_layout.OneRowTimer(cold_bytes=8 << 20)
    weight = torch.randn(OUT, IN)
    row_ms, column_ms = timer(weight, repeats=1)  # 4 copies of each layout: 16 MiB of scratch
    assert row_ms > 0 and column_ms > 0
    assert timer._scratch.numel() == 16 << 20
    timer(torch.randn(4 * OUT, IN), repeats=1)  # 8 MiB: timed over its first 4 MiB of rows
    assert timer._scratch.numel() == 16 << 20
    rows = timer._copies(weight, 4, 0, transposed=False)
    columns = timer._copies(weight, 4, 8 << 20, transposed=True)
    assert all(torch.equal(copy, weight) for copy in rows + columns)
    assert [c.stride() for c in rows] == [(IN, 1)] * 4 and [c.stride() for c in columns] == [(1, OUT)] * 4
    scratch = timer._scratch.data_ptr()
    timer(torch.randn(IN, IN), repeats=1)  # a smaller shape reuses the buffer
    assert timer._scratch.data_ptr() == scratch


def test_the_cpu_runner_tunes_at_start_up(make_llm, monkeypatch):
    calls = []
    monkeypatch.setattr(CausalLM, "tune_single_row", lambda model: calls.append(type(model).__name__))
    make_llm("llama")
    assert calls == ["LlamaForCausalLM"]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_matches_transformers_with_every_weight_column_major(family, make_llm, hf_reference,
                                                                          monkeypatch):
    """The tiny models' weights are under the timing threshold: here every one of them is turned."""
    monkeypatch.setattr(unquantized, "MIN_TIMED_BYTES", 0)
    monkeypatch.setattr(unquantized, "OneRowTimer", lambda: lambda weight: (1.0, 0.5))
    llm = make_llm(family)
    model = llm.llm_engine.executor.runner.model
    layouts = [m.weight.stride(0) == 1 for m in model.modules()  # a one-row weight has a single layout
               if isinstance(getattr(m, "quant_method", None), unquantized.UnquantizedLinearMethod)
               and m.weight.shape[0] > 1]
    assert layouts and all(layouts)
    hf, tokenizer = hf_reference(family)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    expected = [hf_greedy(hf, tokenizer.encode(prompt), 16) for prompt in PROMPTS]
    assert [o.outputs[0].token_ids for o in outputs] == expected
