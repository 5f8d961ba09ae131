"""Rotary cos|sin tables are shared: every layer of a model (and of the models built beside it) with the
same rotary reads one table, which an 8B model's 32 layers otherwise held 32 times (2 GiB of fp32 at
131,072 positions); tables of different rotaries stay apart, and a table goes when no layer holds it."""
from __future__ import annotations

import gc

import torch

from asyncserve.layers.rotary import _TABLES, RotaryEmbedding, inverse_frequencies


def test_layers_with_the_same_rotary_share_one_table(make_llm):
    model = make_llm("llama", dtype="float32").llm_engine.executor.runner.model
    tables = {id(module.cos_sin_cache) for module in model.modules() if isinstance(module, RotaryEmbedding)}
    layers = sum(isinstance(module, RotaryEmbedding) for module in model.modules())
    assert layers > 1 and len(tables) == 1


def test_the_shared_table_is_the_rotary_formula_and_other_rotaries_get_their_own():
    default = {"rope_type": "default"}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    first, second = RotaryEmbedding(16, 128, 10000.0, default), RotaryEmbedding(16, 128, 10000.0, default)
    assert first.cos_sin_cache is second.cos_sin_cache
    assert RotaryEmbedding(16, 128, 500000.0, default).cos_sin_cache is not first.cos_sin_cache
    assert RotaryEmbedding(16, 128, 10000.0, yarn).cos_sin_cache is not first.cos_sin_cache
    freqs = torch.arange(128, dtype=torch.float32)[:, None] * inverse_frequencies(16, 10000.0, default)[None, :]
    torch.testing.assert_close(first.cos_sin_cache, torch.cat([freqs.cos(), freqs.sin()], dim=-1))


def test_a_table_goes_with_the_last_layer_holding_it():
    layer = RotaryEmbedding(8, 77, 1234.5, {"rope_type": "default"})
    assert any(key[:3] == (8, 77, 1234.5) for key in _TABLES.keys())
    del layer
    gc.collect()
    assert not any(key[:3] == (8, 77, 1234.5) for key in _TABLES.keys())
