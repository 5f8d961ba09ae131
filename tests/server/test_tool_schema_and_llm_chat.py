"""The JSON schema that forces tool calls ("required", named) admits exactly the valid calls; LLM.chat takes tools."""
from __future__ import annotations

import jsonschema
import pytest

from asyncserve.server.tools import parse_tool_choice

ITEM = {"$defs": {"unit": {"type": "string", "enum": ["C", "F"]}}, "type": "object",
        "properties": {"unit": {"$ref": "#/$defs/unit"}}, "required": ["unit"]}
TOOLS = [{"type": "function", "function": {"name": "temp", "parameters": ITEM}},
         {"type": "function", "function": {"name": "now"}}]


def _schema(**fields):
    return parse_tool_choice({"tools": TOOLS, **fields}, auto_enabled=False).schema()


def test_required_admits_arrays_of_valid_calls_only():
    schema = _schema(tool_choice="required")
    jsonschema.validate([{"name": "temp", "parameters": {"unit": "C"}}, {"name": "now", "parameters": {}}], schema)
    for bad in ([], [{"name": "temp", "parameters": {"unit": "K"}}], [{"name": "other", "parameters": {}}],
                [{"name": "now"}], {"name": "now", "parameters": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_parallel_tool_calls_false_allows_one_call():
    schema = _schema(tool_choice="required", parallel_tool_calls=False)
    jsonschema.validate([{"name": "now", "parameters": {}}], schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "now", "parameters": {}}] * 2, schema)


def test_a_named_function_is_forced_to_its_own_parameters():
    schema = _schema(tool_choice={"type": "function", "function": {"name": "temp"}})
    jsonschema.validate({"unit": "F"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"unit": "K"}, schema)


def test_a_function_without_parameters_takes_an_empty_object():
    schema = _schema(tool_choice={"type": "function", "function": {"name": "now"}})
    assert schema == {"type": "object", "properties": {}}


def test_llm_chat_renders_tools_through_the_template(make_llm):
    from tests.server.chat_templates import HERMES_TOOLS_TEMPLATE
    from asyncserve import SamplingParams
    llm = make_llm("qwen3", max_model_len=2048)
    messages = [{"role": "user", "content": "Weather?"}]
    [output] = llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False,
                        chat_template=HERMES_TOOLS_TEMPLATE, tools=TOOLS)
    expected = llm.llm_engine.tokenizer.apply_chat_template(messages, tools=TOOLS, chat_template=HERMES_TOOLS_TEMPLATE,
                                                        add_generation_prompt=True, tokenize=False)
    assert '"name": "temp"' in expected
    assert output.prompt_token_ids == llm.llm_engine.tokenizer.encode(expected, add_special_tokens=False)
