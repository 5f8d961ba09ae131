"""vLLM's `bad_words`: each word is banned as the token sequences it encodes to, at a text's start and mid-text.

A single-token word is never sampled; for a longer one, its last token is banned whenever the tokens
generated so far end with the rest of the word. Only generated tokens count, not the prompt (as vLLM).
"""
from __future__ import annotations

from asyncserve.errors import InvalidParameterError


def bad_words_token_ids(bad_words: list[str], tokenizer, vocab_size: int) -> list[list[int]]:
    """Each word's encoding, plus its space-prefixed encoding where that is a different word token."""
    sequences: list[list[int]] = []
    for word in bad_words:
        plain = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not plain:
            raise InvalidParameterError(f"bad_words entry {word!r} encodes to no token.", "bad_words")
        sequences.append(plain)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        # The spaced form counts when the space makes a different first token of the same length
        # (" world" vs "world"), not when it only adds a separate space token.
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    outside = sorted({t for sequence in sequences for t in sequence if not 0 <= t < vocab_size})
    if outside:
        raise InvalidParameterError(f"bad_words encode to token ids {outside} outside the model's vocabulary "
                                    f"[0, {vocab_size}).", "bad_words")
    return sequences


def banned_next_tokens(sequences: list[list[int]], token_ids: list[int], num_prompt_tokens: int) -> list[int]:
    """Tokens that would complete a bad word now, given the sequence's tokens (prompt + output)."""
    num_output = len(token_ids) - num_prompt_tokens
    end = len(token_ids)
    banned = []
    for sequence in sequences:
        prefix_len = len(sequence) - 1
        if prefix_len > num_output:
            continue
        if prefix_len == 0 or token_ids[end - prefix_len:end] == sequence[:-1]:
            banned.append(sequence[-1])
    return banned
