"""Sliding-window models end to end on the CPU: Mistral with a window shorter than its prompts
(no longer capped to it), Gemma 2 / 3 prompt logprobs (window, soft caps, local rope) against
transformers, and how layer windows and rope bases are read from configs of either
transformers generation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from asyncserve import SamplingParams
from asyncserve.models.gemma import _rope_of_layer_type
from asyncserve.models.sliding_window import layer_sliding_window
from asyncserve.testing.tiny_model import build_tiny_checkpoint
from tests.conftest import PROMPTS, generate_joining_mid_flight, hf_greedy

WINDOW = 8
MAX_NEW = 24
LONG_PROMPT = PROMPTS[4]  # ~130 tokens: many windows long


@pytest.fixture(scope="module")
def mistral_window(tmp_path_factory):
    """A tiny Mistral v0.1-style checkpoint attending over the last 8 tokens, and its transformers model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("mistral-sw") / "model", "mistral",
                                 sliding_window=WINDOW)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, model, AutoTokenizer.from_pretrained(path)


def test_mistral_window_is_not_a_length_cap(mistral_window):
    from asyncserve import LLM
    llm = LLM(mistral_window[0], device="cpu", num_gpu_blocks_override=128)
    assert llm.llm_engine.config.model.max_model_len == 2048  # max_position_embeddings, not the window
    model = llm.llm_engine.executor.runner.model
    assert [attention.sliding_window for attention in model.attention_layers()] == [WINDOW, WINDOW]


def test_mistral_with_window_shorter_than_prompts_matches_transformers_mid_flight(mistral_window):
    """Prompts and outputs cross the window; new prompts prefill in chunks while others decode;
    every step the pool's ref counts equal the live block tables."""
    from asyncserve import LLM
    from tests.conftest import assert_pool_clean
    path, model, tokenizer = mistral_window
    llm = LLM(path, device="cpu", num_gpu_blocks_override=512, max_num_batched_tokens=32, max_num_seqs=4)
    engine = llm.llm_engine
    longest_table = 0

    def check_pool():
        nonlocal longest_table
        tables = engine.live_block_tables()
        engine.block_pool.check_invariants(tables)
        longest_table = max([longest_table] + [len(table) for table in tables])

    results = generate_joining_mid_flight(engine, PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_NEW),
                                          after_step=check_pool)
    assert results == [hf_greedy(model, tokenizer.encode(p), MAX_NEW) for p in PROMPTS]
    # Blocks that fell out of the window stay allocated: the long prompt kept all of its blocks.
    long_tokens = len(tokenizer.encode(LONG_PROMPT))
    assert longest_table >= long_tokens // engine.config.cache.block_size
    assert_pool_clean(engine)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_prompt_logprobs_match_transformers(family, make_llm, hf_reference):
    """Every position of a prompt many windows long, scored in chunks: the window, the attention
    and final soft caps (Gemma 2) and the local/global rope (Gemma 3) all move these numbers."""
    llm = make_llm(family, max_num_batched_tokens=16)
    out = llm.generate(LONG_PROMPT, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1),
                       use_tqdm=False)[0]
    model, tokenizer = hf_reference(family)
    ids = tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 10 * WINDOW
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    assert len(out.prompt_logprobs) == len(ids)
    ours = [out.prompt_logprobs[position][ids[position]].logprob for position in range(1, len(ids))]
    expected = [reference[position - 1, ids[position]].item() for position in range(1, len(ids))]
    assert ours == pytest.approx(expected, abs=1e-4)


def test_gemma2_final_soft_cap_bounds_the_logits(make_llm):
    llm = make_llm("gemma2")
    model = llm.llm_engine.executor.runner.model
    hidden = torch.randn(3, model.hf_config.hidden_size) * 100
    logits = model.compute_logits(hidden)
    cap = model.hf_config.final_logit_softcapping
    assert logits.abs().max() <= cap
    assert torch.allclose(logits, torch.tanh(model.lm_head(hidden) / cap) * cap)


def test_gemma_layers_alternate_local_and_global(make_llm):
    for family in ("gemma2", "gemma3"):
        model = make_llm(family).llm_engine.executor.runner.model
        assert [a.sliding_window for a in model.attention_layers()] == [WINDOW, None]
    gemma2 = make_llm("gemma2").llm_engine.executor.runner.model
    assert [a.softcap for a in gemma2.attention_layers()] == [5.0, 5.0]
    assert gemma2.attention_layers()[0].scale == 24 ** -0.5  # query_pre_attn_scalar, not head_dim


# Configs as transformers 4.x reads Hub config.json files: no `layer_types`, no per-type rope dicts.
def _config(**fields):
    return SimpleNamespace(num_hidden_layers=12, **fields)


def test_window_per_layer_from_older_configs():
    gemma3 = _config(sliding_window=512, sliding_window_pattern=6)
    assert [layer_sliding_window(gemma3, i, 6) for i in range(12)] == [512] * 5 + [None] + [512] * 5 + [None]
    gemma2 = _config(sliding_window=4096)
    assert [layer_sliding_window(gemma2, i, 2) for i in range(4)] == [4096, None, 4096, None]
    mistral = _config(sliding_window=4096)
    assert {layer_sliding_window(mistral, i) for i in range(12)} == {4096}
    qwen2 = _config(sliding_window=4096, use_sliding_window=True, max_window_layers=10)
    assert [layer_sliding_window(qwen2, i) for i in (0, 9, 10, 11)] == [None, None, 4096, 4096]
    assert layer_sliding_window(_config(sliding_window=4096, use_sliding_window=False), 3) is None
    assert layer_sliding_window(_config(sliding_window=None), 0) is None


def test_window_per_layer_from_layer_types():
    config = _config(sliding_window=8, layer_types=["full_attention", "sliding_attention"])
    assert [layer_sliding_window(config, i, 6) for i in range(2)] == [None, 8]


def test_gemma3_rope_of_each_layer_type_from_either_config_form():
    older = SimpleNamespace(rope_theta=1e6, rope_scaling={"rope_type": "linear", "factor": 8.0},
                            rope_local_base_freq=10000.0)
    assert _rope_of_layer_type(older, "sliding_attention") == (10000.0, {"rope_type": "default"})
    theta, scaling = _rope_of_layer_type(older, "full_attention")
    assert (theta, scaling["rope_type"], scaling["factor"]) == (1e6, "linear", 8.0)
    newer = SimpleNamespace(rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})
    assert _rope_of_layer_type(newer, "sliding_attention")[0] == 10000.0
    assert _rope_of_layer_type(newer, "full_attention") == (1e6, newer.rope_parameters["full_attention"])
