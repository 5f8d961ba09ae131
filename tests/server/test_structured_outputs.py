"""Structured outputs through the official `openai` client: a random-weight model still answers in the
asked shape, because the grammar masks every step. Bad constraints are 400s naming their field."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import openai
import pytest
import xgrammar

from tests.conftest import assert_pool_clean
from tests.server.conftest import MODEL_NAME, wait_until_idle

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Strings bounded by patterns (maxLength strings are covered by test_strict_json_outputs.py).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,3}$"}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "color", "tags", "ok"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
# response_format allows free whitespace between JSON tokens, which a random model emits at length: a small
# schema keeps its documents short enough to finish.
SMALL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "flag", "schema": SMALL_SCHEMA, "strict": True}}


def _valid_prefix(server, schema: dict | None, text: str) -> bool:
    """Whether `text` can still be completed into a document of `schema` (for outputs cut by max_tokens)."""
    info = xgrammar.TokenizerInfo.from_huggingface(server.engine.tokenizer, vocab_size=server.engine.vocab_size)
    compiler = xgrammar.GrammarCompiler(info)
    grammar = (compiler.compile_json_schema(json.dumps(schema)) if schema is not None
               else compiler.compile_json_schema('{"type": "object"}', strict_mode=False))
    return xgrammar.GrammarMatcher(grammar).accept_string(text)


async def test_json_schema_outputs_validate_over_many_seeds(client):
    texts = []
    for seed in (0, 100, 200):
        result = await client.completions.create(
            model=MODEL_NAME, prompt="JSON:", n=4, seed=seed, temperature=1.0, max_tokens=250,
            extra_body={"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}})
        for choice in result.choices:
            assert choice.finish_reason == "stop", choice.text
            jsonschema.validate(json.loads(choice.text), SCHEMA)
            texts.append(choice.text)
    assert len(set(texts)) > 6  # seeded samples differ: the grammar shapes them, the model still samples


async def test_response_format_json_schema_on_chat(client, server):
    result = await client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, n=2, seed=7, temperature=1.0, max_tokens=100,
        response_format=RESPONSE_FORMAT)
    for choice in result.choices:
        text = choice.message.content
        if choice.finish_reason == "stop":
            jsonschema.validate(json.loads(text), SMALL_SCHEMA)
        else:
            assert choice.finish_reason == "length" and _valid_prefix(server, SMALL_SCHEMA, text)
    assert any(choice.finish_reason == "stop" for choice in result.choices)


async def test_response_format_json_object_parses_as_an_object(client, server):
    result = await client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, n=2, seed=3, temperature=1.0, max_tokens=30,
        response_format={"type": "json_object"})
    for choice in result.choices:
        text = choice.message.content
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert text.lstrip().startswith("{") and _valid_prefix(server, None, text)


async def test_guided_choice_outputs_are_one_of_the_choices(client):
    choices = ["positive", "negative", "neutral"]
    result = await client.completions.create(model=MODEL_NAME, prompt="Sentiment:", n=6, seed=1,
                                             temperature=1.0, max_tokens=20, extra_body={"guided_choice": choices})
    assert all(choice.text in choices and choice.finish_reason == "stop" for choice in result.choices)
    assert len({choice.text for choice in result.choices}) > 1


async def test_regex_outputs_fullmatch(client):
    pattern = r"[a-z]{3}-\d{2,4}"
    result = await client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, n=3, seed=5, temperature=1.0, max_tokens=30,
        extra_body={"structured_outputs": {"regex": pattern}})
    for choice in result.choices:
        assert re.fullmatch(pattern, choice.message.content) and choice.finish_reason == "stop"


async def test_ebnf_grammar_outputs_follow_it(client):
    grammar = 'root ::= answer " " digit\nanswer ::= "yes" | "no"\ndigit ::= [0-9]'
    result = await client.completions.create(model=MODEL_NAME, prompt="Q:", n=4, seed=2, temperature=1.0,
                                             max_tokens=20, extra_body={"guided_grammar": grammar})
    for choice in result.choices:
        assert re.fullmatch(r"(yes|no) [0-9]", choice.text) and choice.finish_reason == "stop"


async def test_guided_json_and_guided_regex_are_vllms_older_names(client):
    result = await client.completions.create(model=MODEL_NAME, prompt="x", seed=0, max_tokens=40,
                                             extra_body={"guided_json": {"type": "boolean"},
                                                         "guided_decoding_backend": "xgrammar"})
    assert json.loads(result.choices[0].text) in (True, False)
    result = await client.completions.create(model=MODEL_NAME, prompt="x", seed=0, max_tokens=20,
                                             extra_body={"guided_regex": r"\d{4}"})
    assert re.fullmatch(r"\d{4}", result.choices[0].text)


async def test_streamed_text_equals_non_streamed(client):
    kwargs = dict(model=MODEL_NAME, messages=MESSAGES, seed=11, temperature=1.0, max_tokens=40,
                  extra_body={"structured_outputs": {"regex": r"[a-z]{2,6}( [a-z]{2,6}){2}"}})
    whole = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(stream=True, **kwargs)
    pieces, finish = [], None
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason == "stop"


async def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model=MODEL_NAME, prompt="Sentiment:", n=2, seed=4, temperature=1.0, max_tokens=20,
                  extra_body={"guided_choice": ["good", "bad", "fine"]})
    whole = await client.completions.create(**kwargs)
    pieces = ["", ""]
    async for chunk in await client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            pieces[choice.index] += choice.text
    assert pieces == [choice.text for choice in whole.choices]


async def test_max_tokens_inside_the_constraint_finishes_with_length(client):
    result = await client.completions.create(model=MODEL_NAME, prompt="x", seed=0, max_tokens=3, temperature=1.0,
                                             extra_body={"guided_regex": "[a-z]{40}"})
    choice = result.choices[0]
    assert choice.finish_reason == "length" and re.fullmatch("[a-z]+", choice.text) and len(choice.text) < 40


async def test_unconstrained_request_in_a_constrained_batch_gets_its_own_tokens(client):
    plain = dict(model=MODEL_NAME, prompt="The capital of France is", max_tokens=12, temperature=0,
                 extra_body={"ignore_eos": True})
    alone = await client.completions.create(**plain)
    constrained = [client.completions.create(model=MODEL_NAME, prompt=f"JSON {i}:", max_tokens=30, seed=i,
                                             temperature=1.0, extra_body={"guided_regex": r"[a-z]{5,30}"})
                   for i in range(3)]
    mixed, *others = await asyncio.gather(client.completions.create(**plain), *constrained)
    assert mixed.choices[0].text == alone.choices[0].text
    assert all(re.fullmatch("[a-z]{5,30}", other.choices[0].text) for other in others)


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "parenthesis"),
    ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar", "missing_rule"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "not several"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": "a", "use_beam_search": True, "n": 2}, "guided_regex", "beam"),
])
async def test_bad_constraints_are_400s_naming_the_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=5, extra_body=body)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and words in error["message"]


async def test_chat_stream_with_bad_schema_is_a_400_before_any_frame(client):
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=MODEL_NAME, messages=MESSAGES, stream=True, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})


async def test_pool_is_clean_after_structured_requests(server):
    await wait_until_idle(server.engine, timeout=10.0)
    assert_pool_clean(server.engine.llm_engine)
