"""Incremental detokenization: text grows token by token, multi-byte characters appear only when whole.

A step's sequences are decoded together (`decode_step`). With `BATCH_DECODE`, that is one call of the Rust
tokenizer's `decode_batch` over every sequence's two windows (exactly the same texts); it is off: the call
releases the GIL, and on the CPU, where the step thread runs Python while the loop decodes, the loop then
waits up to the switch interval (5 ms) to get it back: 256 streams' steps decoded in 2.1 ms in isolation took
~2.2 ms per call in the server, and worst loop lag rose (docs/benchmarks.md). One decode per sequence holds the
GIL throughout. Either way a one-token prefix window's text comes from a per-tokenizer cache (`piece_cache`):
decode is a pure function of the ids, so the cached text is exact, and steady decoding needs one decode call
per token instead of two.
"""
from __future__ import annotations

# Prompt tokens decoded in front of the output, so its first word keeps its leading space.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"
BATCH_DECODE = False  # see the module's docstring


class IncrementalDetokenizer:
    """Decodes a sliding window of ids per token: `prefix` is what was already shown, `read` what is new."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, piece_cache: dict[int, str] | None = None):
        """`piece_cache`: token id -> its text alone, shared by the detokenizers of one tokenizer and one
        skip_special_tokens value (OutputProcessor keeps them)."""
        self.tokenizer = tokenizer
        self._pieces = piece_cache if piece_cache is not None else {}
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # The Rust tokenizer's own decode skips transformers' per-call Python work (5x faster), when
        # transformers would add nothing to it (no clean-up of tokenization spaces).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        fast = backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self._fast_decode = backend.decode if fast else None
        # Sequences of one backend and skip_special_tokens share a decode_batch call (see decode_step).
        self.batch_key = (backend, skip_special_tokens) if fast and hasattr(backend, "decode_batch") else None
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.output_text = ""

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids, skip_special_tokens=self.skip_special_tokens)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def step(self, token_id: int) -> str:
        """Adds one token; returns the text it completes ("" while a character is still partial)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def push(self, token_id: int) -> None:
        """Adds one token to be decoded by `decode_step` with the step's other sequences."""
        self.ids.append(token_id)

    def step_pushed(self) -> str:
        """`step` for a token already `push`ed."""
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end, shows whatever is left, even a partial character as U+FFFD (as `decode` would)."""
        return self._advance(final=True)

    def windows(self) -> tuple[list[int], list[int]] | None:
        """The two id windows that `_advance` decodes (None: nothing new to decode)."""
        if self.read_offset == len(self.ids):
            return None
        return self.ids[self.prefix_offset:self.read_offset], self.ids[self.prefix_offset:]

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        if self.read_offset - self.prefix_offset == 1:  # the steady case: the last token's text alone
            token_id = self.ids[self.prefix_offset]
            prefix_text = self._pieces.get(token_id)
            if prefix_text is None:
                prefix_text = self._pieces[token_id] = self._decode([token_id])
        else:
            prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        return self.take(prefix_text, new_text, final)

    def take(self, prefix_text: str, new_text: str, final: bool = False) -> str:
        """Moves on by what the two windows decoded to; returns the new text (as `_advance`)."""
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT_CHAR) and not final):
            return ""
        delta = new_text[len(prefix_text):]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.output_text += delta
        return delta

    def truncate(self, length: int) -> None:
        """Cuts the text (at a stop string); nothing more is decoded after this."""
        self.output_text = self.output_text[:length]


def find_stop_string(text: str, num_new_chars: int, stops: list[str],
                     include_stop_str: bool) -> tuple[str, int] | None:
    """The stop string that the newest characters completed, and where the text must end."""
    if not stops or not num_new_chars:
        return None
    longest = max(len(stop) for stop in stops)
    search_from = max(0, len(text) - num_new_chars - longest + 1)
    best = None
    for stop in stops:
        position = text.find(stop, search_from)
        if position != -1 and (best is None or position < best[1]):
            best = (stop, position)
    if best is None:
        return None
    stop, position = best
    return stop, position + len(stop) if include_stop_str else position


def decode_step(detokenizers: list, batch: bool | None = None) -> list[str]:
    """`step` for many detokenizers whose new token is already in `ids` (`push`): the text each token
    completes, exactly as `step` would give it. With `batch` (default BATCH_DECODE), detokenizers with a
    Rust backend are decoded in one `decode_batch` call per (backend, skip_special_tokens); the others, and
    all without it, one by one."""
    if not (BATCH_DECODE if batch is None else batch):
        return [detokenizer._advance(final=False) for detokenizer in detokenizers]
    deltas = [""] * len(detokenizers)
    groups: dict[tuple, tuple[list[int], list[list[int]]]] = {}
    for position, detokenizer in enumerate(detokenizers):
        key = detokenizer.batch_key
        if key is None:
            deltas[position] = detokenizer._advance(final=False)
            continue
        windows = detokenizer.windows()
        if windows is None:
            continue
        group = groups.get(key)
        if group is None:
            group = groups[key] = ([], [])
        group[0].append(position)
        group[1].extend(windows)
    for (backend, skip_special_tokens), (positions, windows) in groups.items():
        texts = backend.decode_batch(windows, skip_special_tokens=skip_special_tokens)
        for number, position in enumerate(positions):
            deltas[position] = detokenizers[position].take(texts[2 * number], texts[2 * number + 1])
    return deltas


class NullDetokenizer:
    """Token ids only (skip_tokenizer_init): no text is produced."""

    output_text = ""
    batch_key = None

    def _advance(self, final: bool) -> str:
        return ""

    def step(self, token_id: int) -> str:
        return ""

    def push(self, token_id: int) -> None:
        pass

    def step_pushed(self) -> str:
        return ""

    def flush(self) -> str:
        return ""

    def truncate(self, length: int) -> None:
        pass
