"""The GPU engine's warm-up (engine/warm_up.py) runs real requests, then leaves no trace: counters, timings,
the prefix cache and the pool are a fresh engine's, and what comes next is token-exact. Run here on the CPU
through `run_warm_up` (on the CPU `warm_up` itself does nothing: there is nothing to compile)."""
from __future__ import annotations

from asyncserve import SamplingParams
from asyncserve.engine.warm_up import run_warm_up, warm_up
from tests.conftest import PROMPTS, assert_pool_clean

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def test_warm_up_leaves_a_fresh_engine(make_llm):
    fresh = make_llm("llama", enable_prefix_caching=True)
    expected = [o.outputs[0].token_ids for o in fresh.generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = make_llm("llama", enable_prefix_caching=True)
    engine = llm.llm_engine
    steps = []
    original = engine.step
    engine.step = lambda: steps.append(1) or original()
    run_warm_up(engine)
    engine.step = original
    assert len(steps) >= 4  # prefill, then the decodes of both requests: they did run
    assert_pool_clean(engine)
    assert engine.stats == {"prompt_tokens": 0, "generation_tokens": 0}
    assert not engine.finished_timings and sum(engine.iteration_tokens.counts) == 0
    pool = engine.block_pool
    assert pool.num_cache_queries == pool.num_cache_hits == 0
    assert not pool.cached and all(block.block_hash is None for block in pool.blocks)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == expected
    assert pool.num_cache_hits == 0  # the warm-up's prompt left nothing to hit


def test_a_short_max_model_len_still_fits(make_llm):
    engine = make_llm("llama", max_model_len=4).llm_engine
    run_warm_up(engine)
    assert_pool_clean(engine)


def test_the_cpu_engine_skips_it(make_llm):
    engine = make_llm("llama").llm_engine
    calls = []
    engine.add_request = lambda *args, **kwargs: calls.append(args)
    warm_up(engine)
    assert not calls
