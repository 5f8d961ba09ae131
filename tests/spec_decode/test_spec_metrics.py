"""Speculative decoding's counters, with vLLM's meaning, and the periodic log's line."""
from __future__ import annotations

import pytest

from asyncserve.engine.spec_decode import SpecDecodeStats


def test_log_line_reports_acceptance_since_the_last_one():
    stats = SpecDecodeStats(num_speculative_tokens=3)
    stats.observe(3, 3)
    stats.observe_step()
    since = stats.as_dict()
    stats.observe(3, 1)
    stats.observe(2, 0)
    stats.observe_step()
    assert stats.line(since) == ("speculative decoding: mean acceptance length 1.50, acceptance rate 20.0%, "
                                 "drafts 2 (2.0 per verify step), draft tokens 5, accepted tokens 1")
    assert stats.num_accepted_tokens_per_pos == [2, 1, 1]
    assert stats.mean_acceptance_length == pytest.approx(1 + 4 / 3)


def test_each_finished_request_reports_its_own_counts(make_llm):
    """RequestOutput.metrics of a finished request: its drafts, draft tokens and accepted tokens, which add
    up to the engine's counters; always-right drafts of one prompt, always-wrong ones of another."""
    from asyncserve import SamplingParams
    from tests.conftest import PROMPTS
    from tests.spec_decode.helpers import NGRAM, OracleProposer, WrongProposer, counters, full_sequences

    params = SamplingParams(temperature=0.0, max_tokens=21, ignore_eos=True)
    prompts = PROMPTS[:2]
    expected = full_sequences(make_llm("qwen3"), prompts, params)

    class RightForTheFirst(OracleProposer):
        def propose(self, history, token_ids, max_tokens):
            if expected[0][:len(token_ids)] == token_ids:
                return super().propose(history, token_ids, max_tokens)
            return WrongProposer.propose(self, history, token_ids, max_tokens)

    llm = make_llm("qwen3", speculative_config=NGRAM)
    llm.llm_engine.speculator.proposer = RightForTheFirst(expected)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    first, second = (o.metrics for o in outputs)
    assert first["spec_decode_num_draft_tokens"] > 0 and second["spec_decode_num_draft_tokens"] > 0
    assert first["spec_decode_acceptance_rate"] == 1.0 and first["spec_decode_mean_acceptance_length"] == 5.0
    assert second["spec_decode_num_accepted_tokens"] == 0 and second["spec_decode_mean_acceptance_length"] == 1.0
    engine = counters(llm.llm_engine)
    for name in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
        assert first[f"spec_decode_{name}"] + second[f"spec_decode_{name}"] == engine[f"spec_decode_{name}"]
