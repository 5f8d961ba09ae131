"""Qwen-1's qwen.tiktoken tokenizer: encodes exactly as a tiktoken.Encoding built from the same file with
Qwen's split and special tokens, decodes (also incrementally) what it encodes, and renders ChatML."""
from __future__ import annotations

import base64
import json
import os
import shutil
import unicodedata

import pytest
import tiktoken

from asyncserve.engine.detokenizer import IncrementalDetokenizer
from asyncserve.checkpoints.qwen_tokenizer import QWenTokenizer
from tests.conftest import PROMPTS
from tests.qwen1_checkpoints import QWEN_PAT_STR, QWEN_SPECIAL_TOKENS

TEXTS = PROMPTS + [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n",
    "text<|endoftext|>more <|extra_0|><|extra_204|> and <|im_end|>",
    "numbers 1234567 and   spaces\t\ttabs\r\n\n\nnewlines   ",
    "I'M sure it's they're we'll I'd you've",
    "not special: <|im_star|> <| endoftext|> <| and <|",
    "",
]


@pytest.fixture(scope="module")
def qwen1_dir(qwen1_checkpoint) -> str:
    return qwen1_checkpoint[0]


@pytest.fixture(scope="module")
def tokenizer(qwen1_dir) -> QWenTokenizer:
    return QWenTokenizer.from_directory(qwen1_dir)


@pytest.fixture(scope="module")
def encoding(qwen1_dir) -> tiktoken.Encoding:
    """What Qwen's tokenization_qwen.py builds from the file."""
    ranks = {}
    with open(os.path.join(qwen1_dir, "qwen.tiktoken"), "rb") as f:
        for line in f.read().splitlines():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    specials = {token: len(ranks) + i for i, token in enumerate(QWEN_SPECIAL_TOKENS)}
    return tiktoken.Encoding("qwen-test", pat_str=QWEN_PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


@pytest.mark.parametrize("text", TEXTS)
def test_encodes_like_tiktoken_with_special_tokens(tokenizer, encoding, text):
    expected = encoding.encode(text, allowed_special="all")
    assert tokenizer.encode(text) == expected
    assert tokenizer.encode(text, add_special_tokens=False) == expected
    assert tokenizer(text)["input_ids"] == expected  # transformers' own path agrees
    assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) == expected


def test_text_is_nfc_normalized_first_as_qwens_tokenizer_does(tokenizer, encoding):
    decomposed = unicodedata.normalize("NFD", "café naïve Ångström")
    assert tokenizer.encode(decomposed) == encoding.encode(unicodedata.normalize("NFC", decomposed))
    assert tokenizer.encode(decomposed) != encoding.encode(decomposed)


def test_special_tokens_follow_the_ranks(tokenizer, encoding):
    num_ranks = encoding.n_vocab - len(QWEN_SPECIAL_TOKENS)
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_204|>"]) == \
        [num_ranks, num_ranks + 1, num_ranks + 2, num_ranks + 207]
    assert len(tokenizer) == tokenizer.vocab_size == encoding.n_vocab
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None


@pytest.mark.parametrize("text", TEXTS)
def test_decode_gives_the_text_back(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids)) == tokenizer.decode(ids)


def test_skip_special_tokens_drops_every_special_token(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|><|extra_3|><|endoftext|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_ids_past_the_tokenizer_decode_to_nothing(tokenizer):
    """The model's vocab is padded past the tokenizer's (151936 vs 151851): a sampled padding id must not
    break detokenization."""
    ids = tokenizer.encode("hello") + [len(tokenizer), len(tokenizer) + 40] + tokenizer.encode(" world")
    assert tokenizer.decode(ids) == "hello world"


def test_incremental_detokenization_streams_the_decoded_text(tokenizer):
    text = "Ünïcödé 日本語のテキスト 🍣🎉 and<|im_end|> done"
    prompt = tokenizer.encode("Prompt:")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    deltas = [detokenizer.step(token) for token in tokenizer.encode(text)]
    deltas.append(detokenizer.flush())
    assert "".join(deltas) == detokenizer.output_text == text.replace("<|im_end|>", "")
    assert not any("\ufffd" in delta for delta in deltas)


def test_chat_template_is_chatml_with_qwens_default_system_turn(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bye"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(with_system, tokenize=False, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_a_checkpoints_own_chat_template_wins(qwen1_dir, tmp_path):
    path = shutil.copytree(qwen1_dir, tmp_path / "with-template")
    with open(path / "tokenizer_config.json") as f:
        config = json.load(f)
    config["chat_template"] = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    tokenizer = QWenTokenizer.from_directory(str(path))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"
