"""Qwen-1's tokenizer (`qwen.tiktoken`), read with tiktoken as a transformers tokenizer: the checkpoints
ship it as remote code, which asyncserve never runs.

The file holds one token a line (its bytes in base64, a space, its rank); the special tokens follow the
ranks. Token strings are the bytes in GPT-2's byte-level alphabet, as Hugging Face's Qwen2 tokenizer
spells them, so every transformers habit (convert_ids_to_tokens, apply_chat_template ...) works.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import unicodedata

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILE = "qwen.tiktoken"
# Qwen's pre-tokenizer split (tokenization_qwen.py's PAT_STR).
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
           r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."  # what Qwen's own chat() puts first
# ChatML as Qwen-1's chat() writes it (a system turn first, the default one when none is given).
CHATML_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = '" + DEFAULT_SYSTEM_PROMPT + "' %}{%- set turns = messages %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- for message in turns %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@functools.lru_cache(maxsize=None)
def _byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value (byte b -> _byte_alphabet()[b])."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return tuple(chars[byte] for byte in range(256))


def load_ranks(path: str) -> dict[bytes, int]:
    """qwen.tiktoken -> {token bytes: rank}."""
    with open(path, "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def special_token_ids(path: str) -> dict[str, int]:
    """The special tokens' ids: they follow the file's ranks."""
    start = max(load_ranks(path).values()) + 1
    return {token: start + i for i, token in enumerate(SPECIAL_TOKENS)}


def build_encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """The tiktoken encoding Qwen's own tokenizer builds from the file's ranks."""
    start = max(ranks.values()) + 1
    return tiktoken.Encoding("Qwen", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={token: start + i for i, token in enumerate(SPECIAL_TOKENS)})


def _checkpoint_chat_template(directory: str) -> str | None:
    jinja = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(config):
        with open(config, encoding="utf-8") as f:
            return json.load(f).get("chat_template")
    return None


def is_qwen_tokenizer_dir(directory: str) -> bool:
    return os.path.exists(os.path.join(directory, VOCAB_FILE))


class QWenTokenizer(PreTrainedTokenizer):
    """tiktoken BPE with Qwen's split; special tokens written in a text are encoded as special tokens
    (as Qwen's tokenizer does by default) and no BOS/EOS is ever added."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    byte_level_tokens = True  # token strings spell bytes as GPT-2's alphabet (logprobs read them back)
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, errors: str = "replace", **kwargs):
        self.mergeable_ranks = load_ranks(vocab_file)
        self.encoding = build_encoding(self.mergeable_ranks)
        self.errors = errors
        alphabet = _byte_alphabet()
        self._special = {token: self.encoding.encode_single_token(token) for token in SPECIAL_TOKENS}
        self.first_special_id = self._special[ENDOFTEXT]
        self._id_to_token = {rank: "".join(alphabet[b] for b in token)
                             for token, rank in self.mergeable_ranks.items()}
        self._id_to_token.update({index: token for token, index in self._special.items()})
        self._token_to_id = {token: index for index, token in self._id_to_token.items()}
        self._byte_of = {char: byte for byte, char in enumerate(alphabet)}
        self._added_tokens_decoder = {index: AddedToken(token, special=True, normalized=False)
                                      for token, index in self._special.items()}
        kwargs.setdefault("eos_token", IM_END)
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("additional_special_tokens", [t for t in SPECIAL_TOKENS if t not in (IM_END, ENDOFTEXT)])
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("model_max_length", int(1e12))
        super().__init__(errors=errors, special_tokens_pattern="none", **kwargs)

    @classmethod
    def from_directory(cls, directory: str) -> "QWenTokenizer":
        """The checkpoint's tokenizer; its own chat template if it has one, ChatML otherwise."""
        tokenizer = cls(os.path.join(directory, VOCAB_FILE))
        tokenizer.chat_template = _checkpoint_chat_template(directory) or CHATML_TEMPLATE
        return tokenizer

    # ---- ids <-> text --------------------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        if "<|" not in text:  # no special token can occur: 10x faster than tiktoken's special-token path
            return self.encoding.encode_ordinary(text)
        return self.encoding.encode(text, allowed_special="all")

    def encode(self, text, text_pair=None, add_special_tokens: bool = True, **kwargs) -> list[int]:
        """tiktoken's ids directly for one text (the server's path); transformers' path for the rest."""
        if isinstance(text, str) and text_pair is None and not kwargs:
            return self.encode_text(text)
        return super().encode(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)

    def decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        """tiktoken's decode directly for a list of ids (the detokenizer's path, every step)."""
        if isinstance(token_ids, list) and not kwargs:
            return self._decode(token_ids, skip_special_tokens)
        return super().decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._id_to_token[index] for index in self.encode_text(text)]

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else token_ids
        limit = self.first_special_id if skip_special_tokens else self.vocab_size
        # ids past the tokenizer's vocabulary (the model's padding rows) decode to nothing
        ids = [index for index in ids if index < limit and index in self._id_to_token]
        return self.encoding.decode(ids, errors=self.errors)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        pieces, raw = [], bytearray()
        for token in tokens:
            if token in self._special:
                pieces.append(raw.decode("utf-8", self.errors) + token)
                raw = bytearray()
            else:
                raw.extend(self._byte_of[char] for char in token)
        return "".join(pieces) + raw.decode("utf-8", self.errors)

    # ---- the vocabulary ------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str | None:
        return self._id_to_token.get(index)

    def _add_tokens(self, new_tokens, special_tokens: bool = False) -> int:
        """Only Qwen's own special tokens exist: nothing can be added."""
        unknown = [str(token) for token in new_tokens if str(token) not in self._special]
        if unknown:
            raise ValueError(f"Qwen's tokenizer cannot add tokens: {unknown}")
        return 0

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILE)
        with open(path, "w", encoding="utf-8") as f:
            for token, rank in sorted(self.mergeable_ranks.items(), key=lambda item: item[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        return (path,)
