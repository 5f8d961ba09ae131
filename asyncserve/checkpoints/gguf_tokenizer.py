"""The tokenizer of a GGUF file, rebuilt from its metadata as a Hugging Face tokenizer directory.

Byte-level BPE files (`tokenizer.ggml.model` "gpt2") are rebuilt here from their tokens, merges and
pre-tokenizer name; sentencepiece files ("llama") through transformers' own GGUF tokenizer builders,
which know each family's quirks (Gemma's respelled space tokens and merge order, Phi-3's normalizer).
"""
from __future__ import annotations

import json
import os

from asyncserve.errors import ConfigError

# `tokenizer.ggml.pre` -> the split regex its merges were learned with (None: digits one by one).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "smollm": "digits", "gpt-2": "gpt2", "default": "gpt2",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_level_backend(meta: dict):
    """GPT-2-style byte-level BPE from the file's tokens and merges, split as `tokenizer.ggml.pre` says."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not known to asyncserve (known: "
                          f"{', '.join(sorted(_PRE_TOKENIZERS))}); pass --tokenizer with the model's "
                          "Hugging Face tokenizer.")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
    split = _PRE_TOKENIZERS[pre]
    if split == "digits":  # SmolLM: every digit alone, then GPT-2's byte-level split
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif split == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        if split is _QWEN2_SPLIT:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:  # Llama 3 style: BOS first
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                for token, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(token, normalized=False, special=False)
                        for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
    return backend


def write_tokenizer(path: str, gguf_path: str, meta: dict, max_length: int) -> None:
    """The tokenizer files of the GGUF at `gguf_path` (metadata `meta`), written into `path`."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key):
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None else None

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_backend(meta), bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"), unk_token=token("unknown_token_id"),
            pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
            clean_up_tokenization_spaces=False, model_max_length=max_length)
    elif kind == "llama":  # sentencepiece: transformers rebuilds it (byte tokens, scores, Metaspace)
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                  gguf_file=os.path.basename(gguf_path))
    else:
        raise ConfigError(f"GGUF file {gguf_path!r} has tokenizer model {kind!r}; asyncserve builds 'gpt2' "
                          "(byte-level BPE) and 'llama' (sentencepiece) tokenizers. Pass --tokenizer.")
    tokenizer.save_pretrained(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    # A class name that transformers 4 and 5 both map to the plain tokenizers-backed class.
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if meta.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
