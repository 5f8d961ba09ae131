"""Tool-call parsers on crafted model outputs: the calls and content of the whole text, and the same for
every way of cutting the text into stream deltas (each split point, and one character at a time)."""
from __future__ import annotations

import json

import pytest

from asyncserve.parsers.tool_calls import (
    ArgumentsDelta,
    ContentDelta,
    ToolCall,
    ToolCallStart,
    collect,
    get_tool_parser,
    tool_parser_names,
)

WEATHER = '{"city": "Paris", "days": [1, 2], "units": {"t": "C"}}'
TRICKY = '{"q": "a } ] \\" <tool_call> ; {", "n": -1.5e3, "ok": true, "none": null}'

# text -> (content, [(name, arguments)])
HERMES_CASES = {
    "plain answer, no call": ("plain answer, no call", []),
    "": ("", []),
    f'<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>':
        ("", [("get_weather", WEATHER)]),
    f'Let me check.\n<tool_call>{{"name": "f", "arguments": {TRICKY}}}</tool_call>':
        ("Let me check.\n", [("f", TRICKY)]),
    '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", "arguments": {"x": 1}}'
    '</tool_call>\n': ("", [("a", "{}"), ("b", '{"x": 1}')]),
    # arguments before the name: the call is announced once its name is read
    '<tool_call>{"arguments": {"x": [1]}, "name": "late"}</tool_call>': ("", [("late", '{"x": [1]}')]),
    # no arguments key at all: "{}"
    '<tool_call>{"name": "noargs"}</tool_call>': ("", [("noargs", "{}")]),
    # arguments as a JSON string holding JSON
    '<tool_call>{"name": "s", "arguments": "{\\"k\\": 2}"}</tool_call>': ("", [("s", '{"k": 2}')]),
    # other keys are skipped, a number value included
    '<tool_call>{"id": 7, "name": "g", "extra": [1, "x"], "arguments": {"a": "b"}}</tool_call>':
        ("", [("g", '{"a": "b"}')]),
    # the closing tag is optional at the end of the output (max_tokens, or a model that stops there)
    '<tool_call>{"name": "h", "arguments": {"a": 1}}': ("", [("h", '{"a": 1}')]),
    # cut off inside the arguments: the call is there, its arguments as far as they were written
    '<tool_call>{"name": "cut", "arguments": {"a": [1, 2': ("", [("cut", '{"a": [1, 2')]),
    # text that only looks like a tag, and a tag that opens no JSON object, stay content
    "a <tool_cal b <tool_call>not json</tool_call> c": ("a <tool_cal b <tool_call>not json</tool_call> c", []),
    '<tool_call>{"no_name": 1}</tool_call>done': ('<tool_call>{"no_name": 1}</tool_call>done', []),
    '<tool_call>{"name": 5}': ('<tool_call>{"name": 5}', []),
    "ends with a partial tag <tool_": ("ends with a partial tag <tool_", []),
    "broken <tool_call>{x}": ("broken <tool_call>{x}", []),
    # a named call that breaks: the call stands, what is left of it up to the closing tag is dropped
    '<tool_call>{"name": "f", x: 1}</tool_call>after': ("after", [("f", "{}")]),
    # a call, then text after the closing tag
    '<tool_call>{"name": "f", "arguments": {}}</tool_call>\n and more': ("and more", [("f", "{}")]),
    "unicode: é ✓ <tool_call>{\"name\": \"ü\", \"arguments\": {\"t\": \"日本\"}}</tool_call>":
        ("unicode: é ✓ ", [("ü", '{"t": "日本"}')]),
}

LLAMA3_CASES = {
    '{"name": "get_weather", "parameters": ' + WEATHER + "}": ("", [("get_weather", WEATHER)]),
    '<|python_tag|>{"name": "a", "parameters": {"q": "x;y"}}; {"name": "b", "parameters": {}}':
        ("", [("a", '{"q": "x;y"}'), ("b", "{}")]),
    '  {"name": "c", "arguments": ' + TRICKY + "}": ("", [("c", TRICKY)]),
    "The weather is fine.": ("The weather is fine.", []),
    "Use {\"name\": \"x\"} later": ("Use {\"name\": \"x\"} later", []),
    '{"nom": 1} text': ('{"nom": 1} text', []),
    '{"name": "d", "parameters": {"k": 1}} trailing words': ("trailing words", [("d", '{"k": 1}')]),
    "<|python_": ("<|python_", []),
    '{"name": "f", oops} rest': ("oops} rest", [("f", "{}")]),
    "": ("", []),
}


def _whole(parser_name: str, text: str):
    extracted = get_tool_parser(parser_name)().extract(text)
    return extracted.content, [(call.name, call.arguments) for call in extracted.calls]


def _streamed(parser_name: str, pieces: list[str]) -> list:
    parser = get_tool_parser(parser_name)()
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    return deltas + parser.finish()


def _check_order(deltas: list) -> None:
    """A call is announced (name) before its arguments come, and calls come in index order."""
    announced = -1
    for delta in deltas:
        if isinstance(delta, ToolCallStart):
            assert delta.index == announced + 1
            announced = delta.index
        elif isinstance(delta, ArgumentsDelta):
            assert delta.index == announced and delta.text
        else:
            assert isinstance(delta, ContentDelta) and delta.text


@pytest.mark.parametrize("parser_name,cases", [("hermes", HERMES_CASES), ("llama3_json", LLAMA3_CASES)])
def test_whole_text_gives_the_expected_calls(parser_name, cases):
    for text, expected in cases.items():
        assert _whole(parser_name, text) == expected, text


@pytest.mark.parametrize("parser_name,cases", [("hermes", HERMES_CASES), ("llama3_json", LLAMA3_CASES)])
def test_every_split_point_gives_the_same_calls(parser_name, cases):
    for text, expected in cases.items():
        cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)]
        cuts += [[text[:i], text[i:j], text[j:]] for i in range(0, len(text), 7) for j in range(i, len(text), 5)]
        cuts.append(list(text))
        for pieces in cuts:
            deltas = _streamed(parser_name, pieces)
            _check_order(deltas)
            got = collect(deltas)
            assert (got.content, [(c.name, c.arguments) for c in got.calls]) == expected, pieces


def test_hermes_holds_back_a_possible_tag_and_names_the_call_before_its_arguments():
    parser = get_tool_parser("hermes")()
    assert parser.feed("Hello <tool") == [ContentDelta("Hello ")]
    assert parser.feed("_call>\n{\"na") == []
    assert parser.feed('me": "f", "arguments": {"a"') == [ToolCallStart(0, "f"), ArgumentsDelta(0, '{"a"')]
    assert parser.feed(': 1}}\n</tool_call>') == [ArgumentsDelta(0, ": 1}")]
    assert parser.finish() == []


def test_a_held_back_tag_start_that_is_not_a_tag_is_content_when_the_text_goes_on():
    parser = get_tool_parser("hermes")()
    assert parser.feed("x <tool") == [ContentDelta("x ")]
    assert parser.feed("box") == [ContentDelta("<toolbox")]


def test_arguments_of_parsed_calls_are_json():
    for text, (_, calls) in HERMES_CASES.items():
        for name, arguments in calls:
            if name != "cut":
                json.loads(arguments)


def test_registry_has_vllm_names_and_refuses_unknown_ones():
    assert {"hermes", "llama3_json"} <= set(tool_parser_names())
    with pytest.raises(KeyError, match="hermes"):
        get_tool_parser("nope")


def test_tool_call_objects_collect_like_a_client():
    deltas = [ContentDelta("a"), ToolCallStart(0, "f"), ArgumentsDelta(0, "{"), ArgumentsDelta(0, "}"),
              ToolCallStart(1, "g"), ArgumentsDelta(1, "{}")]
    got = collect(deltas)
    assert got.content == "a" and got.calls == [ToolCall("f", "{}"), ToolCall("g", "{}")]


def _forced(parser, pieces):
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    _check_order(deltas)
    got = collect(deltas)
    return got.content, [(c.name, c.arguments) for c in got.calls]


def test_required_array_parser_gives_each_object_as_a_call_for_every_cut():
    from asyncserve.parsers.tool_calls.forced import RequiredCallsParser
    text = '[{"name": "f", "parameters": {"a": [1, "]"]}}, {"name": "g", "parameters": {}}]'
    expected = ("", [("f", '{"a": [1, "]"]}'), ("g", "{}")])
    for i in range(len(text) + 1):
        assert _forced(RequiredCallsParser(), [text[:i], text[i:]]) == expected
    assert _forced(RequiredCallsParser(), list(text)) == expected


def test_named_function_parser_makes_the_whole_output_the_arguments():
    from asyncserve.parsers.tool_calls.forced import NamedFunctionParser
    text = '{"city": "Paris"}'
    for i in range(len(text) + 1):
        assert _forced(NamedFunctionParser("w"), [text[:i], text[i:]]) == ("", [("w", text)])
    assert _forced(NamedFunctionParser("w"), []) == ("", [("w", "")])
