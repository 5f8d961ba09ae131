"""vLLM's `bad_words`: each word is banned as the token sequences it encodes to, at a text's start and mid-text.

A single-token word is never sampled; for a longer one, its last token is banned whenever the tokens
generated so far end with the rest of the word. Only generated tokens count, not the prompt (as vLLM).
The words are encoded once, when the request is admitted; each step then asks a `BadWordAutomaton` for
the tokens a row may not sample next, at a cost that does not grow with the number of words.
"""
from __future__ import annotations

from collections import deque

from asyncserve.errors import InvalidParameterError


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer.encode(text, add_special_tokens=False)` of each text; a Rust tokenizer encodes the whole
    batch at once, without the GIL, when it gives the same ids (checked on the first text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if texts and backend is not None and hasattr(backend, "encode_batch_fast"):
        encoded = [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
        if encoded[0] == tokenizer.encode(texts[0], add_special_tokens=False):
            return encoded
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def bad_words_token_ids(bad_words: list[str], tokenizer, vocab_size: int) -> list[list[int]]:
    """Each word's encoding, plus its space-prefixed encoding where that is a different word token."""
    words = [word.lstrip() for word in bad_words]
    sequences: list[list[int]] = []
    for word, plain, spaced in zip(words, _encode_all(tokenizer, words),
                                   _encode_all(tokenizer, [" " + word for word in words])):
        if not plain:
            raise InvalidParameterError(f"bad_words entry {word!r} encodes to no token.", "bad_words")
        sequences.append(plain)
        # The spaced form counts when the space makes a different first token of the same length
        # (" world" vs "world"), not when it only adds a separate space token.
        if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
            sequences.append(spaced)
    outside = sorted({t for sequence in sequences for t in sequence if not 0 <= t < vocab_size})
    if outside:
        raise InvalidParameterError(f"bad_words encode to token ids {outside[:10]} outside the model's "
                                    f"vocabulary [0, {vocab_size}).", "bad_words")
    return sequences


def banned_next_tokens(sequences: list[list[int]], token_ids: list[int], num_prompt_tokens: int) -> list[int]:
    """Tokens that would complete a bad word now, given the sequence's tokens (prompt + output): the rule
    itself, one pass over every word; `BadWordAutomaton` answers the same, incrementally."""
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


class BadWordAutomaton:
    """Aho-Corasick over the multi-token words' prefixes (each word without its last token).

    Fed a row's generated tokens one at a time, its state is the longest tail of them that begins some
    prefix; the words whose whole prefix is a tail of the output are those on that state's failure chain,
    so `banned(state)` lists the last tokens that would complete a word now. One step costs O(1)
    (amortized) whatever the number of words. Plain ints, lists and dicts: it pickles to tensor-parallel
    workers with the request.
    """

    ROOT = 0

    def __init__(self, sequences: list[list[int]]):
        self.children: list[dict[int, int]] = [{}]
        self.completions: list[list[int]] = [[]]  # last tokens of the words whose prefix ends here
        for sequence in sequences:
            node = self.ROOT
            for token in sequence[:-1]:
                child = self.children[node].get(token)
                if child is None:
                    child = len(self.children)
                    self.children[node][token] = child
                    self.children.append({})
                    self.completions.append([])
                node = child
            self.completions[node].append(sequence[-1])
        self.fail = [self.ROOT] * len(self.children)
        queue = deque(self.children[self.ROOT].values())  # depth 1 fails to the root
        while queue:
            node = queue.popleft()
            for token, child in self.children[node].items():
                self.fail[child] = self.next(self.fail[node], token)
                queue.append(child)

    def next(self, node: int, token: int) -> int:
        """The state after `token`."""
        children, fail = self.children, self.fail
        while True:
            child = children[node].get(token)
            if child is not None:
                return child
            if node == self.ROOT:
                return self.ROOT
            node = fail[node]

    def banned(self, node: int) -> list[int]:
        """The last tokens of every word whose prefix the output now ends with (the failure chain's)."""
        banned: set[int] = set()
        while node != self.ROOT:
            banned.update(self.completions[node])
            node = self.fail[node]
        return sorted(banned)
