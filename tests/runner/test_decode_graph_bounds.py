"""Which context bounds the decode graphs capture for a padded batch size (runner/decode_graphs.py)."""
from __future__ import annotations

import pytest
from torch import nn

from asyncserve.kernels import attention_decode
from asyncserve.runner import decode_graphs

from asyncserve.layers.attention import PagedAttention
from asyncserve.runner.decode_graphs import SHORT_CONTEXT_MAX_BATCH, context_bounds


@pytest.fixture(autouse=True)
def short_graphs_on(monkeypatch):
    monkeypatch.setattr(decode_graphs, "SHORT_CONTEXT_GRAPHS", True)
    monkeypatch.setattr(attention_decode, "LONG_SINGLE_PARTITION", True)  # the kernel's side of the switch


def test_switched_off_one_graph_per_size(monkeypatch):
    monkeypatch.setattr(decode_graphs, "SHORT_CONTEXT_GRAPHS", False)
    monkeypatch.setattr(attention_decode, "LONG_SINGLE_PARTITION", False)
    assert context_bounds(_Model([2, 2]), 1, 32768) == [32768]


class _Model(nn.Module):
    def __init__(self, kv_heads: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(PagedAttention(8, heads, 64, 0.125) for heads in kv_heads)

    def attention_layers(self):
        return list(self.layers)


def test_small_batches_add_the_single_partition_bound_below_max_model_len():
    model = _Model([2, 2])
    short = model.layers[0].single_partition_len(1)
    assert context_bounds(model, 1, 32768) == [short, 32768]


def test_the_short_bound_is_the_tightest_layers():
    model = _Model([8, 1])
    assert context_bounds(model, 8, 32768)[0] == min(layer.single_partition_len(8) for layer in model.layers)


def test_one_bound_when_max_model_len_fits_one_partition():
    model = _Model([2])
    short = model.layers[0].single_partition_len(1)
    assert context_bounds(model, 1, short) == [short]
    assert context_bounds(model, 1, 100) == [100]


def test_large_batches_and_attention_free_models_keep_one_graph():
    assert context_bounds(_Model([2]), SHORT_CONTEXT_MAX_BATCH + 8, 32768) == [32768]
    assert context_bounds(_Model([]), 1, 32768) == [32768]
