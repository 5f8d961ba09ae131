"""Incremental detokenization: text grows token by token, multi-byte characters appear only when whole."""
from __future__ import annotations

# Prompt tokens decoded in front of the output, so its first word keeps its leading space.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Decodes a sliding window of ids per token: `prefix` is what was already shown, `read` what is new."""

    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        # The Rust tokenizer's own decode skips transformers' per-call Python work (5x faster), when
        # transformers would add nothing to it (no clean-up of tokenization spaces).
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._fast_decode = (backend.decode if backend is not None
                             and not getattr(tokenizer, "clean_up_tokenization_spaces", False) else None)
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

    def flush(self) -> str:
        """At the end, shows whatever is left, even a partial character as U+FFFD (as `decode` would)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self.read_offset == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
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


class NullDetokenizer:
    """Token ids only (skip_tokenizer_init): no text is produced."""

    output_text = ""

    def step(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""

    def truncate(self, length: int) -> None:
        pass
