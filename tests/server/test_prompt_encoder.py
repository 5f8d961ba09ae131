"""The byte bound behind the cheap over-long refusal is a true bound, and the encoder gives `encode`'s ids."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from asyncserve.server.errors import ApiError
from asyncserve.server.prompt_encoder import PromptEncoder, max_bytes_per_token

FAMILIES = ("qwen3", "llama", "llama3")
# Text with what shrinks under normalization (NFKC: U+1D400 -> "A"; Hangul jamo compose), long runs
# of one character, and plain words.
SHRINKING = st.sampled_from(["\U0001d400", "\u1100\u1161\u11a8", "e\u0301", "\u212a", "\uff21", " ", "aaaa",
                             "\n\n", "<|im_start|>", "\u00e9", "\U0001f363"])
TEXTS = st.one_of(st.text(max_size=200), st.lists(SHRINKING, max_size=80).map("".join))


@pytest.fixture(scope="module")
def tokenizers_by_family(tiny_model_dir):
    return {family: AutoTokenizer.from_pretrained(tiny_model_dir(family)) for family in FAMILIES}


@settings(max_examples=150, deadline=None)
@given(text=TEXTS)
def test_no_text_has_fewer_tokens_than_its_bytes_over_the_bound(tokenizers_by_family, text):
    for family, tokenizer in tokenizers_by_family.items():
        bound = max_bytes_per_token(tokenizer)
        assert bound is not None, family
        num_tokens = len(tokenizer.encode(text, add_special_tokens=False))
        assert num_tokens >= math.ceil(len(text.encode()) / bound), (family, text)


@settings(max_examples=60, deadline=None)
@given(text=TEXTS, special=st.booleans())
def test_the_encoder_gives_exactly_the_tokenizers_ids(tokenizers_by_family, text, special):
    for tokenizer in tokenizers_by_family.values():
        encoder = PromptEncoder(tokenizer, max_model_len=10 ** 6)
        assert encoder.encode(text, special, "prompt") == tokenizer.encode(text, add_special_tokens=special)


def test_a_text_the_bound_proves_too_long_is_refused_without_its_token_count(tokenizers_by_family):
    tokenizer = tokenizers_by_family["qwen3"]
    encoder = PromptEncoder(tokenizer, max_model_len=64)
    text = "x" * int(64 * encoder.max_bytes_per_token)
    with pytest.raises(ApiError) as refused:
        encoder.check_bytes(text, "prompt")
    assert refused.value.status == 400 and refused.value.param == "prompt"
    assert "has at least 64" in refused.value.message
    encoder.check_bytes(text[:-int(encoder.max_bytes_per_token)], "prompt")  # one token fewer: not provable


def test_a_prompt_of_max_model_len_tokens_is_refused_with_its_count(tokenizers_by_family):
    tokenizer = tokenizers_by_family["qwen3"]
    text = "hello " * 40
    num_tokens = len(tokenizer.encode(text))
    assert PromptEncoder(tokenizer, max_model_len=num_tokens + 1).encode(text, True, "prompt")
    with pytest.raises(ApiError, match=f"has {num_tokens}:"):
        PromptEncoder(tokenizer, max_model_len=num_tokens).encode(text, True, "prompt")


def _wrapped(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


@pytest.mark.parametrize("make", [
    lambda: Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")),  # a whole word -> [UNK]
    lambda: Tokenizer(models.BPE({"[UNK]": 0, "a": 1}, [], unk_token="[UNK]", fuse_unk=True)),
])
def test_tokenizers_that_fold_unknown_runs_into_one_token_get_no_bound(make):
    assert max_bytes_per_token(_wrapped(make())) is None


def test_text_dropping_pre_tokenizers_and_normalizers_get_no_bound():
    whitespace = Tokenizer(models.BPE({"[UNK]": 0, "a": 1}, [], unk_token="[UNK]"))
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()  # drops every space
    assert max_bytes_per_token(_wrapped(whitespace)) is None
    stripping = Tokenizer(models.BPE({"[UNK]": 0, "a": 1}, [], unk_token="[UNK]"))
    stripping.normalizer = normalizers.Strip()
    assert max_bytes_per_token(_wrapped(stripping)) is None
