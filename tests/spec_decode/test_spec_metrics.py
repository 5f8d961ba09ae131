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
