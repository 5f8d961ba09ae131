"""Greedy decoding with n-gram speculation is token-exact with greedy decoding without it: requests joining
mid-flight, prefix-cache hits, preemption; drafts are proposed and accepted (the counters say so), blocks
of rejected drafts go back to the pool and are never cached."""
from __future__ import annotations

import pytest

from asyncserve import SamplingParams
from asyncserve.engine.kv_cache_manager import hash_block
from tests.conftest import PROMPTS, generate_joining_mid_flight
from tests.spec_decode.helpers import NGRAM, counters, generate_ids

# Prompts that repeat, so prompt lookup finds something. The tiny random Llama rarely repeats itself:
# a negative frequency penalty (applied at every verified position, drafts counted) makes it loop.
REPEATING = ["ab " * 12, "1 2 3 1 2 3 1 2 3", " ".join(["The quick brown fox jumps over the lazy dog."] * 3),
             "Hello, my name is", "The capital of France is", "Once upon a time, in a land far away, there lived a"]
CASES = [("llama", {"frequency_penalty": -1.0}), ("qwen3", {}), ("gemma2", {"repetition_penalty": 0.5})]
MAX_NEW = 40


def _greedy(extra: dict, max_tokens: int = MAX_NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **extra)


def assert_blocks_consistent(engine) -> None:
    """Ref counts match the live block tables, and every block a sequence offered to the prefix cache
    holds the hash of its real tokens (never of rejected drafts)."""
    engine.block_pool.check_invariants(engine.live_block_tables())
    block_size = engine.kv_manager.block_size
    for request in engine.requests.values():
        for seq in request.seqs:
            if seq.is_finished:
                continue
            # A launched step may have computed its in-flight token and drafts ahead of the known tokens.
            assert seq.num_computed_tokens <= seq.num_tokens + seq.num_in_flight + len(seq.draft_token_ids)
            assert len(seq.blocks) <= -(-(seq.num_tokens + len(seq.draft_token_ids)) // block_size) + 1
            parent = seq.cache_salt
            for index in range(seq.num_cached_blocks):
                parent = hash_block(parent, seq.token_ids[index * block_size:(index + 1) * block_size])
                assert seq.blocks[index].block_hash == parent


def run_checking_blocks(engine, prompts, params) -> list[list[int]]:
    """Each prompt's output ids, the engine stepped to the end with its blocks checked after every step."""
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), engine.input_processor.process(prompt, params))
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[int(output.request_id)] = list(output.outputs[0].token_ids)
        assert_blocks_consistent(engine)
    return [results[i] for i in range(len(prompts))]


def _assert_speculated(engine, min_accepted: int) -> None:
    stats = counters(engine)
    assert stats["spec_decode_num_drafts"] > 0
    assert stats["spec_decode_num_draft_tokens"] >= stats["spec_decode_num_drafts"]
    assert stats["spec_decode_num_accepted_tokens"] >= min_accepted, stats
    assert stats["spec_decode_num_accepted_tokens"] < stats["spec_decode_num_draft_tokens"]  # some rejected
    assert sum(stats["spec_decode_num_accepted_tokens_per_pos"]) == stats["spec_decode_num_accepted_tokens"]


@pytest.mark.parametrize("family,extra", CASES)
def test_batch_is_token_exact(family, extra, make_llm):
    expected = generate_ids(make_llm(family), REPEATING, _greedy(extra))
    spec = make_llm(family, speculative_config=NGRAM)
    assert generate_ids(spec, REPEATING, _greedy(extra)) == expected
    _assert_speculated(spec.llm_engine, min_accepted=20)


@pytest.mark.parametrize("family,extra", CASES[:2])
def test_requests_joining_mid_flight_are_token_exact(family, extra, make_llm):
    prompts = REPEATING + PROMPTS[:3]
    expected = generate_ids(make_llm(family), prompts, _greedy(extra))
    spec = make_llm(family, speculative_config=NGRAM, max_num_batched_tokens=32, max_num_seqs=4)
    engine = spec.llm_engine
    results = generate_joining_mid_flight(engine, prompts, _greedy(extra),
                                          after_step=lambda: assert_blocks_consistent(engine))
    assert results == expected
    _assert_speculated(engine, min_accepted=10)


def test_prefix_cache_hits_are_token_exact(make_llm):
    family, extra = CASES[1]
    expected = generate_ids(make_llm(family, enable_prefix_caching=False), REPEATING, _greedy(extra))
    spec = make_llm(family, speculative_config=NGRAM)
    engine = spec.llm_engine
    assert generate_ids(spec, REPEATING, _greedy(extra)) == expected
    hits_before = engine.block_pool.num_cache_hits
    # The same prompts again: their prompt blocks (and full blocks of earlier outputs) come from the cache.
    assert generate_ids(spec, REPEATING, _greedy(extra)) == expected
    assert engine.block_pool.num_cache_hits > hits_before
    _assert_speculated(engine, min_accepted=20)


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_preemption_is_token_exact(preemption_mode, make_llm):
    family, extra = CASES[0]
    params = _greedy(extra, max_tokens=48)
    expected = generate_ids(make_llm(family, max_model_len=96), REPEATING, params)  # some end at max_model_len
    spec = make_llm(family, speculative_config=NGRAM, block_size=8, num_gpu_blocks_override=24,
                    max_model_len=96, preemption_mode=preemption_mode, swap_space=0.01)
    engine = spec.llm_engine
    assert run_checking_blocks(engine, REPEATING, params) == expected
    assert engine.scheduler.num_preemptions > 0
    _assert_speculated(engine, min_accepted=10)


def test_large_batches_do_not_speculate(make_llm):
    """Above disable_by_batch_size running sequences no drafts are proposed and steps pipeline as without
    speculation (the device is fed the previous step's tokens); fewer running sequences speculate again."""
    family, extra = CASES[1]
    params = [_greedy(extra, 8)] * 4 + [_greedy(extra)] * 2  # two run on once the others finished
    expected = generate_ids(make_llm(family), REPEATING, params)
    spec = make_llm(family, speculative_config={**NGRAM, "disable_by_batch_size": 2})
    engine = spec.llm_engine
    proposals = []  # (running sequences, how many got drafts) at each schedule
    propose = engine.speculator.propose

    def recording(running):
        propose(running)
        proposals.append((len(running), sum(1 for seq in running if seq.draft_token_ids)))

    engine.speculator.propose = recording
    assert generate_ids(spec, REPEATING, params) == expected
    assert all(drafted == 0 for running, drafted in proposals if running > 2)
    assert any(drafted for running, drafted in proposals if running <= 2)
    assert engine.executor.runner.num_device_fed_steps > 0
