"""n-gram (prompt lookup) proposals: what followed the latest earlier occurrence of a sequence's last n tokens.

Vectorized over the sequence's token array: one elementwise comparison per n up to prompt_lookup_max, no
Python loop over the history. Each sequence keeps its tokens in a growing numpy buffer (`TokenHistory`), so a step copies only
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
    (preferring one with `max_tokens` after it), for the longest n from `lookup_min` to `lookup_max` that
    occurs; empty if none does. One comparison over the history per n: the occurrences of the last n
    tokens are those of the last n - 1 preceded by the right token."""
    length = tokens.shape[0]
    # matches[s]: an occurrence of the last n tokens starts at s (s <= length - n - 1, so at least one
    # token follows it and it is not the suffix itself).
    matches = tokens[:length - 1] == tokens[length - 1] if length > 1 else np.zeros(0, dtype=bool)
    found, found_n = None, 0
    for n in range(1, min(lookup_max, length - 1) + 1):
        if n > 1:
            matches = (tokens[:length - n] == tokens[length - n]) & matches[1:]
        if n >= lookup_min:
            hits = np.flatnonzero(matches)
            if not hits.size:
                break  # no longer suffix occurs either
            found, found_n = hits, n
        elif not matches.any():
            break
    if found is None:
        return tokens[:0]
    # In a repeating run the latest occurrence overlaps the suffix and has fewer tokens after it.
    whole = found[found <= length - found_n - max_tokens]
    start = int(whole[-1] if whole.size else found[-1]) + found_n
    return tokens[start:start + max_tokens]


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
