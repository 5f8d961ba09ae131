"""ASYNCSERVE_FUSED_ROTARY_CACHE (layers/attention.py, on unless =0): the attention layers take rotary and the
cache write in one call (on the CPU its reference: rotary, then the write) wherever the rotary offers its table.
Switched on, greedy output stays token-exact with transformers, and the fused call is what ran."""
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


def test_switched_off_takes_the_two_calls(make_llm, monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "FUSE_ROTARY_WITH_CACHE", False)
    monkeypatch.setattr(attention, "rotary_write_kv_cache", lambda *a, **k: calls.append(1))
    make_llm("llama").generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert not calls


@pytest.mark.parametrize("value,expected", [(None, True), ("1", True), ("0", False)])
def test_on_unless_set_to_zero(value, expected):
    """The batch-1 switches read at import (rotary + cache write, short-context graphs, the one-row fusions,
    the one-token MoE, the packed-integer timing): on by default, off with =0."""
    import os
    import subprocess
    import sys
    names = ["ASYNCSERVE_FUSED_ROTARY_CACHE", "ASYNCSERVE_SHORT_CONTEXT_GRAPHS", "ASYNCSERVE_FUSED_GATED_ROW",
             "ASYNCSERVE_FUSED_NORM_ROW", "ASYNCSERVE_MOE_ONE_ROW", "ASYNCSERVE_QUANT_TUNE"]
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update({name: value for name in names} if value is not None else {})
    code = ("from asyncserve.layers import attention, moe; from asyncserve.runner import decode_graphs;"
            "from asyncserve.kernels import attention_decode;"
            "from asyncserve.layers.quantization import unquantized, packed_int;"
            "print([attention.FUSE_ROTARY_WITH_CACHE, decode_graphs.SHORT_CONTEXT_GRAPHS,"
            " attention_decode.LONG_SINGLE_PARTITION, unquantized.FUSE_GATED_ROW, unquantized.FUSE_NORM_ROW,"
            " moe.TUNE_ONE_ROW_MOE, packed_int.TUNE_PACKED_INT])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([expected] * 7)


def test_head_norms_in_the_fused_call_keep_qwen3_exact(make_llm, hf_reference, monkeypatch):
    """ASYNCSERVE_FUSED_QK_NORM=1: Qwen3's q_norm / k_norm go to the rotary + cache-write call (its reference
    on the CPU) instead of running as their own ops; greedy tokens stay transformers'."""
    calls = []
    original = attention.rotary_write_kv_cache
    monkeypatch.setattr(attention, "FUSE_QK_NORM", True)
    monkeypatch.setattr(attention, "rotary_write_kv_cache",
                        lambda *a, **k: calls.append(k.get("qk_norm") is not None) or original(*a, **k))
    llm = make_llm("qwen3")
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
    model, tokenizer = hf_reference("qwen3")
    assert [o.outputs[0].token_ids for o in outputs] == [hf_greedy(model, tokenizer.encode(p), MAX_NEW)
                                                         for p in PROMPTS]
    assert calls and all(calls)  # every layer's norms went into the one call


def test_head_norms_stay_their_own_ops_when_the_switch_is_off(make_llm, monkeypatch):
    calls = []
    original = attention.rotary_write_kv_cache
    monkeypatch.setattr(attention, "rotary_write_kv_cache",
                        lambda *a, **k: calls.append(k.get("qk_norm") is not None) or original(*a, **k))
    make_llm("qwen3").generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)
    assert calls and not any(calls)
