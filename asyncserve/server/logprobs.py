"""Engine logprobs in OpenAI's two shapes: completions' parallel arrays and chat's per-token objects.

With vLLM's `return_tokens_as_token_ids` (the request field, else the server's --return-tokens-as-token-ids)
each token is named "token_id:<id>" instead of its text: a token that is no valid text on its own (a piece
of a multi-byte character) stays identifiable.
"""
from __future__ import annotations

import re

from asyncserve.outputs import Logprob, PositionLogprobs

_FLOOR = -9999.0  # JSON has no -inf; OpenAI and vLLM report impossible tokens this way
_REPLACEMENT = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted: byte-level BPE pieces back to raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()


def _value(logprob: Logprob) -> float:
    return max(logprob.logprob, _FLOOR)


def _top(position: PositionLogprobs, count: int) -> list[tuple[int, Logprob]]:
    """The `count` most likely tokens at one position (the chosen one may or may not be among them)."""
    if count <= 0:
        return []
    return sorted(position.items(), key=lambda item: item[1].logprob, reverse=True)[:count]


def token_id_name(token_id: int) -> str:
    """vLLM's name of a token under return_tokens_as_token_ids."""
    return f"token_id:{token_id}"


class LogprobFormatter:
    def __init__(self, tokenizer, tokens_as_token_ids: bool = False):
        self.tokenizer = tokenizer
        self.tokens_as_token_ids = tokens_as_token_ids  # the server's default (--return-tokens-as-token-ids)
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = ("ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder)
                            or getattr(tokenizer, "byte_level_tokens", False))  # Qwen-1's tiktoken one
        self._bytes: dict[int, list[int]] = {}

    def token_bytes(self, token_id: int, text: str) -> list[int]:
        """The token's raw UTF-8 bytes, also for a piece of a multi-byte character (whose text is U+FFFD)."""
        cached = self._bytes.get(token_id)
        if cached is not None:
            return cached
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        raw = None
        if isinstance(piece, str):
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:
                raw = [int(fallback.group(1), 16)]
            elif self._byte_level and all(char in _BYTE_LEVEL for char in piece) and \
                    token_id not in self.tokenizer.all_special_ids:
                raw = [_BYTE_LEVEL[char] for char in piece]
        if raw is None:
            raw = list(text.encode())
        self._bytes[token_id] = raw
        return raw

    def token_text(self, token_id: int, position: PositionLogprobs | None) -> str:
        entry = position.get(token_id) if position else None
        if entry is not None and entry.decoded_token is not None:
            return entry.decoded_token
        return self.tokenizer.decode([token_id])

    def as_token_ids(self, requested: bool | None) -> bool:
        """The request's return_tokens_as_token_ids, or the server's default when it sent none."""
        return self.tokens_as_token_ids if requested is None else requested

    def completion_token(self, token_id: int, position: PositionLogprobs | None,
                         as_token_ids: bool = False) -> tuple[str, int]:
        """(the token as OpenAI's completions API names it, its length in the text).

        A piece of a multi-byte character has no text of its own; OpenAI writes it as "bytes:\\xe6\\x97".
        """
        text = self.token_text(token_id, position)
        if as_token_ids:  # the offsets still count the text's characters
            return token_id_name(token_id), len(text)
        if _REPLACEMENT in text:
            raw = bytes(self.token_bytes(token_id, text))
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw), len(text)
        return text, len(text)

    def completion(self, token_ids: list[int], positions: list[PositionLogprobs | None], num_top: int,
                   text_offset: int, as_token_ids: bool | None = None) -> dict:
        """`{tokens, token_logprobs, top_logprobs, text_offset}`; top_logprobs hold up to num_top + 1
        entries: the sampled token is always included, as in OpenAI's API."""
        as_ids = self.as_token_ids(as_token_ids)
        tokens, values, tops, offsets = [], [], [], []
        for index, token_id in enumerate(token_ids):
            position = positions[index] if index < len(positions) else None
            token, length = self.completion_token(token_id, position, as_ids)
            tokens.append(token)
            offsets.append(text_offset)
            text_offset += length
            if position is None:  # the first prompt token has no context
                values.append(None)
                tops.append(None)
                continue
            values.append(_value(position[token_id]))
            top = {token: _value(position[token_id])}
            for top_id, logprob in _top(position, num_top):
                top.setdefault(self.completion_token(top_id, position, as_ids)[0], _value(logprob))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def prompt(self, positions: list[PositionLogprobs | None]) -> list[dict | None]:
        """vLLM's `prompt_logprobs`: for each prompt token (the first, without context, is None), token id ->
        {logprob, rank, decoded_token}, the prompt's own token first, then the top ones."""
        return [None if position is None else
                {str(token_id): {"logprob": _value(entry), "rank": entry.rank,
                                 "decoded_token": self.token_text(token_id, position)}
                 for token_id, entry in position.items()}
                for position in positions]

    def chat(self, token_ids: list[int], positions: list[PositionLogprobs], num_top: int,
             as_token_ids: bool | None = None) -> list[dict]:
        """The entries of `logprobs.content`: one per generated token."""
        as_ids = self.as_token_ids(as_token_ids)
        return [{**self._chat_token(token_id, position, as_ids),
                 "top_logprobs": [self._chat_token(top_id, position, as_ids) for top_id, _ in _top(position, num_top)]}
                for token_id, position in zip(token_ids, positions)]

    def _chat_token(self, token_id: int, position: PositionLogprobs, as_ids: bool) -> dict:
        """{token, logprob, bytes}. Named by id, a token's `bytes` stay its text's (vLLM writes the id's own
        characters in top_logprobs' bytes: the text's are what a client can use)."""
        text = self.token_text(token_id, position)
        return {"token": token_id_name(token_id) if as_ids else text, "logprob": _value(position[token_id]),
                "bytes": self.token_bytes(token_id, text)}
