"""ASYNCSERVE_FUSED_ROTARY_CACHE=1 (layers/attention.py): the attention layers take rotary and the cache write
in one call (on the CPU its reference: rotary, then the write) wherever the rotary offers its table. Switched
on, greedy output stays token-exact with transformers, and the fused call is what ran."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from asyncserve.layers import attention
from tests.conftest import PROMPTS, hf_greedy

MAX_NEW = 12


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = attention.rotary_write_kv_cache
    monkeypatch.setattr(attention, "FUSE_ROTARY_WITH_CACHE", True)
    monkeypatch.setattr(attention, "rotary_write_kv_cache", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt_oss"])
def test_switched_on_greedy_stays_exact(family, make_llm, hf_reference, fused_calls):
    llm = make_llm(family)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    model, tokenizer = hf_reference(family)
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(model, tokenizer.encode(p), MAX_NEW)
                                                         for p in PROMPTS]
    assert fused_calls  # every attention layer took the fused call


def test_off_by_default(make_llm, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "rotary_write_kv_cache", lambda *a, **k: calls.append(1))
    make_llm("llama").generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert not attention.FUSE_ROTARY_WITH_CACHE and not calls
