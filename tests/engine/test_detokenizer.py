"""Incremental detokenization against the tokenizer's own decode."""
from __future__ import annotations

import pytest

from asyncserve.engine.detokenizer import IncrementalDetokenizer, find_stop_string
from asyncserve.testing.tiny_model import build_tokenizer

TEXTS = [
    "Hello world, this is plain ASCII text.",
    "naïve façade — 日本語のテキスト, 龘 and 🦀🍣🎉 emoji; Ελληνικά и кириллица.",
    "  leading spaces and\ttabs\nand newlines  ",
]


@pytest.fixture(scope="module", params=["byte_level", "metaspace"])
def tokenizer(request):
    return build_tokenizer(request.param)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decode(tokenizer, text):
    prompt_ids = tokenizer.encode("Prompt:", add_special_tokens=False)
    output_ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.step(token_id) for token_id in output_ids]
    detokenizer.flush()
    whole = tokenizer.decode(prompt_ids + output_ids)
    assert "".join(deltas) == detokenizer.output_text == whole[len(tokenizer.decode(prompt_ids)):]
    assert "\ufffd" not in "".join(deltas)


def test_multibyte_character_appears_only_when_complete():
    tokenizer = build_tokenizer("byte_level")
    ids = tokenizer.encode("🦀", add_special_tokens=False)
    assert len(ids) > 1, "the test needs a character split over several tokens"
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("x", add_special_tokens=False))
    deltas = [detokenizer.step(token_id) for token_id in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "🦀"


def test_unfinished_character_is_flushed_as_replacement():
    tokenizer = build_tokenizer("byte_level")
    ids = tokenizer.encode("🦀", add_special_tokens=False)[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer, [])
    assert "".join(detokenizer.step(token_id) for token_id in ids) == ""
    assert detokenizer.flush() == tokenizer.decode(ids)


def test_special_tokens_are_skipped_or_kept():
    tokenizer = build_tokenizer("byte_level")
    ids = tokenizer.encode("hi", add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    skipping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=True)
    keeping = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=False)
    for token_id in ids:
        skipping.step(token_id)
        keeping.step(token_id)
    assert skipping.output_text == "hi"
    assert keeping.output_text == "hi<|im_end|>"


def test_find_stop_string_only_looks_at_new_text():
    assert find_stop_string("abc STOP def", 4, ["STOP"], False) is None  # completed earlier
    assert find_stop_string("abc ST", 2, ["STOP"], False) is None
    assert find_stop_string("abc STOP", 2, ["STOP"], False) == ("STOP", 4)
    assert find_stop_string("abc STOP", 2, ["STOP"], True) == ("STOP", 8)
    assert find_stop_string("a XY b", 4, ["b", "XY"], False) == ("XY", 2)
