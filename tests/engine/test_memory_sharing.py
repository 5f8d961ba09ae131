"""Prefix caching, chunked prefill and preemption never change greedy output."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from tests.conftest import PROMPTS

GREEDY = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
SHARED = "System: you are a helpful assistant who answers briefly and precisely. " * 3


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture
def reference(make_llm):
    llm = make_llm("qwen2", enable_prefix_caching=False)
    return _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False))


def test_prefix_cache_hit_gives_identical_output(make_llm):
    prompts = [SHARED + question for question in ("What is 2+2?", "Name a colour.", "Say hi.")]
    plain = _tokens(make_llm("qwen2", enable_prefix_caching=False).generate(prompts, GREEDY, use_tqdm=False))
    llm = make_llm("qwen2", enable_prefix_caching=True)
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    second = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(first) + _tokens(second)[1:] == plain[:1] + plain[1:]
    assert _tokens(second) == plain
    shared_tokens = len(llm.get_tokenizer().encode(SHARED))
    assert all(o.num_cached_tokens >= (shared_tokens // 16 - 1) * 16 for o in second)
    assert llm.llm_engine.block_pool.num_cache_hits > 0


def test_chunked_prefill_at_a_tiny_budget_gives_identical_output(make_llm, reference):
    llm = make_llm("qwen2", enable_prefix_caching=False, max_num_batched_tokens=8)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_without_chunked_prefill_long_prompts_wait_their_turn(make_llm, reference):
    llm = make_llm("qwen2", enable_prefix_caching=False, enable_chunked_prefill=False,
                   max_num_batched_tokens=2048, max_model_len=2048)
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preemption_when_blocks_run_out_gives_identical_output(make_llm, prefix_caching):
    prompts = [f"Story {i}: once upon a time, " + "far away " * i for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    expected = _tokens(make_llm("qwen2", enable_prefix_caching=False).generate(prompts, params,
                                                                               use_tqdm=False))
    # 16 blocks of 16 = 256 token slots; the eight sequences grow to ~600 tokens together.
    llm = make_llm("qwen2", enable_prefix_caching=prefix_caching, num_gpu_blocks_override=16,
                   max_model_len=256)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_max_num_seqs_caps_the_running_batch(make_llm, reference):
    llm = make_llm("qwen2", enable_prefix_caching=False, max_num_seqs=2)
    engine = llm.llm_engine
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), engine.input_processor.process(prompt, GREEDY))
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[int(output.request_id)] = output.outputs[0].token_ids
        assert engine.scheduler.num_running <= 2
    assert [results[i] for i in range(len(PROMPTS))] == reference


def test_n_shares_the_prompt_blocks(make_llm):
    prompt = SHARED + "Tell me a story."
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=4, ignore_eos=True)
    shared = make_llm("qwen3", enable_prefix_caching=False)
    separate = make_llm("qwen3", enable_prefix_caching=False)
    shared.llm_engine.add_request("n4", shared.llm_engine.input_processor.process(prompt, SamplingParams(n=4, **_fields(params))))
    for i in range(4):
        separate.llm_engine.add_request(str(i), separate.llm_engine.input_processor.process(prompt, params))
    peak_shared = _peak_blocks(shared.llm_engine)
    peak_separate = _peak_blocks(separate.llm_engine)
    num_prompt_blocks = len(shared.get_tokenizer().encode(prompt)) // 16
    assert peak_shared <= peak_separate - 3 * num_prompt_blocks


def _fields(params):
    return dict(temperature=params.temperature, seed=params.seed, max_tokens=params.max_tokens,
                ignore_eos=params.ignore_eos)


def _peak_blocks(engine) -> int:
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.block_pool.num_blocks - engine.block_pool.num_free_blocks)
        engine.block_pool.check_invariants(engine.live_block_tables())
    return peak


def test_swap_preemption_gives_identical_output(make_llm):
    prompts = [f"Story {i}: once upon a time, " + "far away " * i for i in range(8)]
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    expected = _tokens(make_llm("qwen2", enable_prefix_caching=False).generate(prompts, params,
                                                                               use_tqdm=False))
    llm = make_llm("qwen2", enable_prefix_caching=False, num_gpu_blocks_override=16, max_model_len=256,
                   preemption_mode="swap", swap_space=0.01)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == expected
    assert llm.llm_engine.kv_manager.num_swaps > 0
    assert len(llm.llm_engine.kv_manager.free_host_blocks) == llm.llm_engine.executor.runner.kv_pool.host_storage.shape[2]
