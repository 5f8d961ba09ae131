"""What a request brings to sampling (logit_bias, allowed_token_ids, bad_words, stop ids), checked against
the model and turned into compact tensors once, when the request is admitted (off the event loop where the
request is big): no step walks a request's lists again. The runner puts them on its device once
(runner/constraint_rows.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from asyncserve.sample.bad_words import BadWordAutomaton, bad_words_token_ids
from asyncserve.errors import InvalidParameterError


@dataclass(frozen=True, eq=False)
class TokenConstraints:
    """One request's token lists, validated; CPU tensors and plain data, so it pickles to workers."""

    vocab_size: int
    logit_bias_ids: torch.Tensor | None = None     # [B] int64, distinct
    logit_bias_values: torch.Tensor | None = None  # [B] float32
    allowed_token_ids: torch.Tensor | None = None  # [A] int64: every other token is -inf
    banned_token_ids: torch.Tensor | None = None   # [K] int64: single-token bad words, never sampled
    bad_words: BadWordAutomaton | None = None       # multi-token bad words, banned after their prefix
    min_tokens: int = 0
    min_tokens_banned: torch.Tensor | None = None   # [E] int64: stop and eos ids, banned before min_tokens
    stop_token_ids: frozenset[int] = frozenset()    # what `stop_token_ids` ends the output with

    @property
    def has_fixed_bias(self) -> bool:
        """Whether every step adds the same row: logit_bias, allowed_token_ids, single-token bad words."""
        return (self.logit_bias_ids is not None or self.allowed_token_ids is not None
                or self.banned_token_ids is not None)

    @property
    def shapes_sampling(self) -> bool:
        """Whether sampling a row of this request reads anything here."""
        return self.has_fixed_bias or self.bad_words is not None or self.min_tokens_banned is not None


def _ids(values) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.int64)


def _check_length(name: str, token_ids, vocab_size: int) -> None:
    if len(token_ids) > vocab_size:
        raise InvalidParameterError(f"{name} has {len(token_ids)} entries; at most {vocab_size} (the vocabulary's "
                                    "size) are allowed: a longer list repeats ids.", name)


def _check_inside(name: str, token_ids, vocab_size: int) -> None:
    _check_length(name, token_ids, vocab_size)
    outside = sorted({t for t in token_ids if not 0 <= t < vocab_size})
    if outside:
        raise InvalidParameterError(f"{name} {outside[:10]} are outside the vocabulary [0, {vocab_size}).", name)


def build_token_constraints(params, vocab_size: int, tokenizer, eos_token_ids: list[int]) -> TokenConstraints:
    """Raises InvalidParameterError naming the field for ids outside the vocabulary, lists longer than it,
    or bad_words without a tokenizer."""
    logit_bias = params.logit_bias or {}
    _check_inside("logit_bias", logit_bias, vocab_size)
    _check_inside("allowed_token_ids", params.allowed_token_ids or (), vocab_size)
    _check_length("stop_token_ids", params.stop_token_ids, vocab_size)
    single, multi = [], []
    if params.bad_words:
        if tokenizer is None:
            raise InvalidParameterError("bad_words need a tokenizer; this engine runs with "
                                        "skip_tokenizer_init. Use logit_bias.", "bad_words")
        for sequence in bad_words_token_ids(params.bad_words, tokenizer, vocab_size):
            (single if len(sequence) == 1 else multi).append(sequence)
    ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
    # Ids past the vocabulary end nothing: they are never sampled.
    min_tokens_banned = sorted(t for t in ends if t < vocab_size) if params.min_tokens else []
    return TokenConstraints(
        vocab_size=vocab_size,
        logit_bias_ids=_ids(logit_bias) if logit_bias else None,
        logit_bias_values=torch.tensor(list(logit_bias.values()), dtype=torch.float32) if logit_bias else None,
        allowed_token_ids=_ids(params.allowed_token_ids) if params.allowed_token_ids else None,
        banned_token_ids=_ids(sorted({s[0] for s in single})) if single else None,
        bad_words=BadWordAutomaton(multi) if multi else None,
        min_tokens=params.min_tokens,
        min_tokens_banned=_ids(min_tokens_banned) if min_tokens_banned else None,
        stop_token_ids=frozenset(params.stop_token_ids))
