"""Text -> token ids for the server, refusing prompts that cannot fit `max_model_len` as early as is provable.

Two refusals come before the token ids exist as a Python list (building a list of millions of ints holds
the GIL for hundreds of milliseconds):
- from the byte length alone, when the tokenizer's structure proves a lower bound on the token count:
  every token covers at most `max_bytes_per_token` bytes of the text, so a text of B bytes has at least
  ceil(B / max_bytes_per_token) tokens. A token can cover a single byte, so the converse never holds.
- from the Rust encoding's length, before its ids are converted.
"""
from __future__ import annotations

import json
import math

from asyncserve.server.errors import bad_request

# Unicode normalization and lowercasing can shrink text: NFKC maps 4-byte U+1D400 to "A" (1 byte);
# Hangul jamo compose 9 bytes into 3; the Kelvin sign (3 bytes) lowercases to "k". 4 bounds them all.
_SHRINKING_NORMALIZERS = {"NFC": 4, "NFD": 4, "NFKC": 4, "NFKD": 4, "Lowercase": 4, "Prepend": 1}
# Pre-tokenizers that keep every byte of the text (Whitespace and the like drop characters).
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "UnicodeScripts"}
_PROBE = "Hello, world! Ünïcödé 日本語 🍣 <|im_start|> 123  \n\t end"


def _normalizer_shrink(spec: dict | None) -> float | None:
    """How many times fewer bytes the normalized text can have at most; None when unbounded."""
    if spec is None:
        return 1
    kind = spec.get("type")
    if kind == "Sequence":
        factor = 1
        for part in spec.get("normalizers", []):
            part_factor = _normalizer_shrink(part)
            if part_factor is None:
                return None
            factor *= part_factor
        return factor
    if kind == "Replace":
        pattern, content = spec.get("pattern", {}).get("String"), spec.get("content", "")
        if pattern is None or not content:
            return None  # a regex, or a deletion: any amount of text can vanish
        return max(1, len(pattern.encode()) / len(content.encode()))
    return _SHRINKING_NORMALIZERS.get(kind)


def _keeps_all_text(spec: dict | None) -> bool:
    if spec is None:
        return True
    kind = spec.get("type")
    if kind == "Sequence":
        return all(_keeps_all_text(part) for part in spec.get("pretokenizers", []))
    if kind in ("Split", "Punctuation"):
        return spec.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS


def max_bytes_per_token(tokenizer) -> float | None:
    """An upper bound on the UTF-8 bytes of input text one token can stand for; None if none is provable."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model", {})
    vocab = backend.get_vocab(with_added_tokens=True)
    # Unigram and WordPiece turn a whole unknown word into one token; so does BPE with fuse_unk, unless
    # byte fallback spells every unknown character as byte tokens (all 256 of them must exist).
    if model.get("type") != "BPE":
        return None
    if model.get("fuse_unk") and not (model.get("byte_fallback")
                                      and all(f"<0x{byte:02X}>" in vocab for byte in range(256))):
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    if shrink is None or not _keeps_all_text(spec.get("pre_tokenizer")):
        return None
    # Token strings are at least as long in UTF-8 as the bytes they stand for (byte-level "Ġ" is 2 bytes
    # for 1; "<0x41>" is 6 for 1); an unknown character is one token of at most 4 bytes.
    longest = max((len(token.encode()) for token in vocab), default=0)
    return max(4, longest) * shrink


class PromptEncoder:
    """Encodes prompts as `tokenizer.encode` does; raises 400 for those of `max_model_len` tokens or more."""

    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.max_bytes_per_token = max_bytes_per_token(tokenizer)
        self._backend = self._fast_backend(tokenizer)

    @staticmethod
    def _fast_backend(tokenizer):
        """The Rust tokenizer, when it gives exactly `tokenizer.encode`'s ids (checked on a probe)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        for special in (True, False):
            if backend.encode_batch_fast([_PROBE], add_special_tokens=special)[0].ids != tokenizer.encode(
                    _PROBE, add_special_tokens=special):
                return None
        return backend

    def check_bytes(self, text: str, param: str) -> None:
        """Refuses, from its length alone, a text that provably has max_model_len tokens or more."""
        if self.max_bytes_per_token is None:
            return
        num_bytes = len(text.encode("utf-8", "surrogatepass"))
        at_least = math.ceil(num_bytes / self.max_bytes_per_token)
        if at_least >= self.max_model_len:
            raise too_long(self.max_model_len, f"at least {at_least}", param)

    def encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        self.check_bytes(text, param)
        if self._backend is None:
            token_ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
            num_tokens = len(token_ids)
        else:  # encodes without the GIL; the ids become a list only once they are known to fit
            encoding = self._backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
            num_tokens = len(encoding)
            token_ids = None
        if num_tokens >= self.max_model_len:
            raise too_long(self.max_model_len, str(num_tokens), param)
        return token_ids if token_ids is not None else encoding.ids


def too_long(max_len: int, num_tokens: str, param: str):
    return bad_request(f"This model's maximum context length is {max_len} tokens, and the {param} has "
                       f"{num_tokens}: at least one token must be generated. Shorten the {param}.", param)
