"""GPT-OSS's harmony output: `openai_gptoss` puts the analysis channel in reasoning and the final channel
in content, `openai` turns messages to `functions.NAME` into tool calls (after the reasoning parser, or
alone on the raw output); the same result for every cut of the text into deltas."""
from __future__ import annotations

import pytest

from asyncserve.parsers.harmony import Header, parse_header
from asyncserve.parsers.reasoning import get_reasoning_parser, reasoning_parser_names
from asyncserve.parsers.tool_calls import (
    ToolCall,
    collect,
    get_tool_parser,
    tool_parser_names,
)

ANALYSIS = "<|channel|>analysis<|message|>User asks the weather. Use the tool.<|end|>"
CALL = ('<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json'
        '<|message|>{"city": "Oslo"}')
FINAL = "<|start|>assistant<|channel|>final<|message|>It is -3 C in Oslo."

# text -> (reasoning, content after the reasoning parser, the tool parser's calls and content from that)
CASES = [
    (ANALYSIS + FINAL, "User asks the weather. Use the tool.", "It is -3 C in Oslo.", []),
    (ANALYSIS + FINAL + "<|return|>", "User asks the weather. Use the tool.", "It is -3 C in Oslo.", []),
    (ANALYSIS + CALL, "User asks the weather. Use the tool.", None, [ToolCall("get_weather", '{"city": "Oslo"}')]),
    (ANALYSIS + CALL + "<|call|>", "User asks the weather. Use the tool.", None,
     [ToolCall("get_weather", '{"city": "Oslo"}')]),
    # the recipient in the role part, a preamble on the commentary channel, two calls
    (("<|channel|>commentary<|message|>Checking both.<|end|>"
      '<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>{"city": "A"}<|call|>'
      '<|start|>assistant to=functions.get_time<|channel|>commentary json<|message|>{}<|call|>'),
     None, "Checking both.", [ToolCall("get_weather", '{"city": "A"}'), ToolCall("get_time", "{}")]),
    # two analysis messages: one reasoning text, a line apart
    (("<|channel|>analysis<|message|>First.<|end|><|start|>assistant<|channel|>analysis<|message|>Second.<|end|>"
      "<|start|>assistant<|channel|>final<|message|>Done."), "First.\nSecond.", "Done.", []),
    ("<|channel|>analysis<|message|>cut off while think", "cut off while think", None, []),
    ("<|channel|>final<|message|>Only an answer.", None, "Only an answer.", []),
    ("No framing at all (a model that ignores harmony).", None, "No framing at all (a model that ignores harmony).", []),
    ("<|channel|>fin", None, "<|channel|>fin", []),  # a header that never opened a body is kept as text
    ("", None, None, []),
]


def _parse(text: str, pieces: list[str] | None = None):
    """The reasoning parser over the deltas, then the tool parser over its content, as the server chains them."""
    reasoning_parser, tool_parser = get_reasoning_parser("openai_gptoss")(), get_tool_parser("openai")()
    reasoning = ""
    deltas = []
    for piece in pieces if pieces is not None else [text]:
        r, c = reasoning_parser.feed(piece)
        reasoning += r
        deltas += tool_parser.feed(c) if c else []
    r, c = reasoning_parser.finish()
    reasoning += r
    deltas += (tool_parser.feed(c) if c else []) + tool_parser.finish()
    extracted = collect(deltas)
    return reasoning or None, extracted.content or None, extracted.calls


@pytest.mark.parametrize("text,reasoning,content,calls", CASES)
def test_whole_text(text, reasoning, content, calls):
    assert _parse(text) == (reasoning, content, calls)


@pytest.mark.parametrize("text,reasoning,content,calls", CASES)
def test_every_cut_gives_the_same_result(text, reasoning, content, calls):
    cuts = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    cuts += [[text[:i], text[i:j], text[j:]] for i in range(0, len(text), 3) for j in range(i, len(text), 5)]
    cuts.append(list(text))
    for pieces in cuts:
        assert _parse(text, pieces) == (reasoning, content, calls), pieces


def test_reasoning_parser_alone_leaves_calls_framed_in_the_content():
    reasoning, content = get_reasoning_parser("openai_gptoss")().extract(ANALYSIS + CALL + "<|call|>")
    assert reasoning == "User asks the weather. Use the tool."
    assert content == ('<|start|>assistant to=functions.get_weather<|channel|>commentary<|message|>'
                       '{"city": "Oslo"}<|call|>')


def test_tool_parser_alone_reads_the_raw_output_with_analysis_as_content():
    extracted = get_tool_parser("openai")().extract(ANALYSIS + CALL)
    assert extracted.content == "User asks the weather. Use the tool."
    assert extracted.calls == [ToolCall("get_weather", '{"city": "Oslo"}')]


def test_reasoning_streams_before_the_answer_and_a_split_marker_is_held_back():
    parser = get_reasoning_parser("openai_gptoss")()
    assert parser.feed("<|channel|>analysis<|mess") == ("", "")
    assert parser.feed("age|>think<|e") == ("think", "")
    assert parser.feed("nd|><|start|>assistant<|channel|>final<|message|>ans") == ("", "ans")
    assert parser.feed("wer") == ("", "wer")
    assert parser.finish() == ("", "")


def test_calls_stream_their_arguments_as_they_come():
    parser = get_tool_parser("openai")()
    deltas = parser.feed('<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": ')
    assert [type(d).__name__ for d in deltas] == ["ToolCallStart", "ArgumentsDelta"]
    assert deltas[0].name == "f" and deltas[1].text == '{"a": '
    assert parser.feed("1}")[0].text == "1}"
    assert parser.finish() == []


@pytest.mark.parametrize("header,expected", [
    ("<|channel|>analysis", Header("analysis", None)),
    ("assistant<|channel|>commentary to=functions.get_weather <|constrain|>json", Header("commentary", "functions.get_weather")),
    (" to=functions.f<|channel|>commentary json", Header("commentary", "functions.f")),
    ("assistant<|channel|>analysis to=python code", Header("analysis", "python")),
])
def test_headers(header, expected):
    assert parse_header(header) == expected
    assert expected.function == (expected.recipient[len("functions."):]
                                 if expected.recipient and expected.recipient.startswith("functions.") else None)


def test_both_keep_special_tokens_and_have_vllm_names():
    assert "openai_gptoss" in reasoning_parser_names() and "openai" in tool_parser_names()
    assert get_reasoning_parser("openai_gptoss").keeps_special_tokens
    assert get_tool_parser("openai").keeps_special_tokens
    assert not get_reasoning_parser("qwen3").keeps_special_tokens
