"""n-gram (prompt lookup) proposals: what followed the latest earlier occurrence of a sequence's last n tokens.

Vectorized over the sequence's token array: n elementwise comparisons per n tried, no Python loop over the
history. Each sequence keeps its tokens in a growing numpy buffer (`TokenHistory`), so a step copies only
the tokens added since the last one.
"""
from __future__ import annotations

import numpy as np


class TokenHistory:
    """A sequence's token ids as a numpy array, appended to as the sequence grows (amortized doubling)."""

    __slots__ = ("buffer", "length")

    def __init__(self) -> None:
        self.buffer = np.empty(64, dtype=np.int64)
        self.length = 0

    def sync(self, token_ids: list[int]) -> np.ndarray:
        """The array of `token_ids`, which extends what was synced before."""
        total = len(token_ids)
        if total > self.buffer.shape[0]:
            grown = np.empty(max(total, 2 * self.buffer.shape[0]), dtype=np.int64)
            grown[:self.length] = self.buffer[:self.length]
            self.buffer = grown
        if total > self.length:
            self.buffer[self.length:total] = token_ids[self.length:total]
            self.length = total
        return self.buffer[:total]


def find_continuation(tokens: np.ndarray, lookup_min: int, lookup_max: int, max_tokens: int) -> np.ndarray:
    """Up to `max_tokens` tokens that followed the most recent earlier occurrence of the last n tokens
    (preferring one with `max_tokens` after it), trying the longest n first (from `lookup_max` down to
    `lookup_min`); empty if none occurs."""
    length = tokens.shape[0]
    for n in range(min(lookup_max, length - 1), lookup_min - 1, -1):
        suffix = tokens[length - n:]
        # Candidate starts 0 .. length - n - 1: the occurrence ends before the last token, so at least
        # one token follows it.
        matches = tokens[:length - n] == suffix[0]
        for offset in range(1, n):
            matches &= tokens[offset:length - n + offset] == suffix[offset]
        hits = np.flatnonzero(matches)
        if hits.size:
            # The latest occurrence followed by max_tokens tokens (in a repeating run the latest one
            # overlaps the suffix and has fewer after it), else the latest.
            whole = hits[hits <= length - n - max_tokens]
            start = int(whole[-1] if whole.size else hits[-1]) + n
            return tokens[start:start + max_tokens]
    return tokens[:0]


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, lookup_min: int, lookup_max: int):
        self.num_speculative_tokens = num_speculative_tokens
        self.lookup_min = lookup_min
        self.lookup_max = lookup_max

    def propose(self, history: TokenHistory, token_ids: list[int], max_tokens: int) -> list[int]:
        """At most min(num_speculative_tokens, max_tokens) drafts to follow `token_ids`."""
        limit = min(self.num_speculative_tokens, max_tokens)
        if limit <= 0:
            return []
        tokens = history.sync(token_ids)
        return find_continuation(tokens, self.lookup_min, self.lookup_max, limit).tolist()
