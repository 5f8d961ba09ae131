"""Prompt lookup: the tokens after the latest earlier occurrence of the last n tokens, longest n first."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncserve.engine.spec_decode.ngram_proposer import NgramProposer, TokenHistory, find_continuation


def _find(tokens, lookup_min=1, lookup_max=3, max_tokens=3):
    return find_continuation(np.array(tokens, dtype=np.int64), lookup_min, lookup_max, max_tokens).tolist()


def test_proposes_what_followed_the_suffix():
    assert _find([1, 2, 3, 4, 5, 9, 2, 3]) == [4, 5, 9]


def test_longest_match_wins_over_a_later_shorter_one():
    # "7 2 3" occurs once (followed by 10); "2 3" alone occurs later (followed by 20).
    assert _find([7, 2, 3, 10, 11, 2, 3, 20, 21, 7, 2, 3], lookup_max=3) == [10, 11, 2]


def test_latest_occurrence_of_equal_length_wins():
    assert _find([5, 6, 1, 8, 5, 6, 2, 8, 5, 6], lookup_max=2, max_tokens=2) == [2, 8]


def test_prefers_an_occurrence_with_a_full_continuation():
    # In a repeating run the latest occurrence of "4 4" overlaps the end: the one before has 3 tokens after it.
    assert _find([1, 4, 4, 4, 4, 4], lookup_min=2, lookup_max=2, max_tokens=3) == [4, 4, 4]
    # None has a full continuation: the latest one gives what it has.
    assert _find([4, 4, 4], lookup_min=2, lookup_max=2, max_tokens=3) == [4]


def test_nothing_below_lookup_min():
    assert _find([1, 2, 3, 4, 1, 9], lookup_min=2, lookup_max=3) == []
    # n = 1: "1" at 0 has three tokens after it, the later "1" at 4 only two.
    assert _find([1, 2, 3, 4, 1, 9, 1], lookup_min=1, lookup_max=3) == [2, 3, 4]


def test_short_histories_propose_nothing():
    assert _find([], 1, 3) == []
    assert _find([5], 1, 3) == []


def test_history_grows_with_the_sequence():
    history = TokenHistory()
    tokens = list(range(100))
    assert history.sync(tokens[:10]).tolist() == tokens[:10]
    assert history.sync(tokens).tolist() == tokens  # past the first buffer
    tokens.append(7)
    assert history.sync(tokens)[-2:].tolist() == [99, 7]


def test_proposer_caps_the_number_of_drafts():
    proposer = NgramProposer(num_speculative_tokens=2, lookup_min=1, lookup_max=2)
    tokens = [1, 2, 3, 4, 1, 2]
    assert proposer.propose(TokenHistory(), tokens, max_tokens=10) == [3, 4]
    assert proposer.propose(TokenHistory(), tokens, max_tokens=1) == [3]
    assert proposer.propose(TokenHistory(), tokens, max_tokens=0) == []


def _reference(tokens: list[int], lookup_min: int, lookup_max: int, max_tokens: int) -> list[int]:
    """The rule, spelled out with loops."""
    length = len(tokens)
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        starts = [s for s in range(length - n) if tokens[s:s + n] == tokens[length - n:]]
        if starts:
            whole = [s for s in starts if s + n + max_tokens <= length]
            start = (whole or starts)[-1] + n
            return tokens[start:start + max_tokens]
    return []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), max_size=40), st.integers(1, 4), st.integers(0, 3), st.integers(1, 5))
def test_matches_the_rule_spelled_out(tokens, lookup_min, extra, max_tokens):
    lookup_max = lookup_min + extra
    assert _find(tokens, lookup_min, lookup_max, max_tokens) == _reference(tokens, lookup_min, lookup_max,
                                                                          max_tokens)
