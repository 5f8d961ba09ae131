"""Reasoning parsers: `<think>` text apart from the answer, the same for every cut of the text into deltas."""
from __future__ import annotations

import pytest

from asyncserve.parsers.reasoning import get_reasoning_parser, reasoning_parser_names

# (parser, chat_template_kwargs, text) -> (reasoning, content)
CASES = [
    ("qwen3", None, "<think>\nLet me think.\n</think>\n\nThe answer is 4.", ("\nLet me think.\n", "\n\nThe answer is 4.")),
    ("qwen3", None, "No thinking here.", (None, "No thinking here.")),
    ("qwen3", None, "<think>cut off while thinking", ("cut off while thinking", None)),
    ("qwen3", None, "<thinking> is not the tag", (None, "<thinking> is not the tag")),
    ("qwen3", None, "<thi", (None, "<thi")),
    ("qwen3", None, "<think></think>only answer", (None, "only answer")),
    ("qwen3", None, "<think>a</think>b</think>c", ("a", "b</think>c")),
    ("qwen3", {"enable_thinking": False}, "<think>x</think>y", (None, "<think>x</think>y")),
    ("qwen3", {"enable_thinking": True}, "<think>x</think>y", ("x", "y")),
    ("deepseek_r1", None, "The prompt opened the block.</think>Answer.", ("The prompt opened the block.", "Answer.")),
    ("deepseek_r1", None, "<think>Own tag.</think>Answer.", ("Own tag.", "Answer.")),
    ("deepseek_r1", None, "Still thinking at the end", ("Still thinking at the end", None)),
    ("deepseek_r1", None, "ends in a partial </thi", ("ends in a partial </thi", None)),
    ("deepseek_r1", None, "", (None, None)),
    ("deepseek_r1", None, "</think>", (None, None)),
]


@pytest.mark.parametrize("name,kwargs,text,expected", CASES)
def test_whole_text_split(name, kwargs, text, expected):
    assert get_reasoning_parser(name)(kwargs).extract(text) == expected


@pytest.mark.parametrize("name,kwargs,text,expected", CASES)
def test_every_split_point_gives_the_same_split(name, kwargs, text, expected):
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    cuts += [[text[:i], text[i:j], text[j:]] for i in range(len(text)) for j in range(i, len(text))]
    cuts.append(list(text))
    for pieces in cuts:
        parser = get_reasoning_parser(name)(kwargs)
        reasoning = content = ""
        for piece in pieces:
            r, c = parser.feed(piece)
            reasoning, content = reasoning + r, content + c
        r, c = parser.finish()
        assert ((reasoning + r) or None, (content + c) or None) == expected, pieces


def test_reasoning_comes_before_content_and_a_split_end_tag_is_held_back():
    parser = get_reasoning_parser("qwen3")()
    assert parser.feed("<thi") == ("", "")
    assert parser.feed("nk>abc</th") == ("abc", "")
    assert parser.feed("ink>answer") == ("", "answer")
    assert parser.finish() == ("", "")


def test_registry_has_vllm_names():
    assert {"qwen3", "deepseek_r1"} <= set(reasoning_parser_names())
    with pytest.raises(KeyError, match="deepseek_r1"):
        get_reasoning_parser("nope")
