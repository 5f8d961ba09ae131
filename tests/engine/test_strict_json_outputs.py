"""Structured JSON that strict parsers accept, on both grammar backends, from a model that writes control
characters, backslashes and quotes wherever a mask lets it: every finished document passes `json.loads`
(what the OpenAI SDK uses) and validates against its schema, whatever string rules the schema has."""
from __future__ import annotations

import json

import jsonschema
import pytest

from asyncserve import LLM, SamplingParams, StructuredOutputsParams
from tests.checkpoint_edits import prefer_json_breaking_tokens

SEEDS = (0, 100)


def _string(**rules) -> dict:
    return {"type": "string", **rules}


def _object(**properties) -> dict:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


SCHEMAS = {
    "plain strings": _object(city=_string(), note=_string()),
    "length bounds": _object(city=_string(maxLength=12), code=_string(minLength=2, maxLength=4),
                             word=_string(minLength=3)),
    "patterns": _object(printable=_string(pattern="^[ -~]{1,8}$"), any=_string(pattern="^.{2,5}$"),
                        dense=_string(pattern=r"^\S{1,6}$"), spaced=_string(pattern=r"^[\s\S]{0,4}$")),
    "formats": _object(day=_string(format="date"), id=_string(format="uuid"), ip=_string(format="ipv4")),
    "nested": _object(people={"type": "array", "minItems": 1, "maxItems": 2,
                              "items": _object(name=_string(maxLength=6),
                                               tags={"type": "array", "maxItems": 3,
                                                     "items": _string(minLength=1, maxLength=3)})}),
    "untyped bounds": _object(loose={"maxLength": 5}),
}


@pytest.fixture(scope="module")
def breaking_model(tiny_model_dir, tmp_path_factory) -> str:
    return prefer_json_breaking_tokens(tiny_model_dir("qwen3"), tmp_path_factory.mktemp("json-breaking") / "model")


@pytest.fixture(scope="module", params=["xgrammar", "guidance"])
def llm(request, breaking_model):
    return LLM(breaking_model, device="cpu", num_gpu_blocks_override=512, structured_outputs_backend=request.param)


def test_the_model_writes_control_characters_when_nothing_stops_it(llm):
    params = SamplingParams(temperature=1.0, seed=0, max_tokens=8)
    text = llm.generate(["JSON:"], params, use_tqdm=False)[0].outputs[0].text
    assert sum(ord(char) < 0x20 for char in text) >= 6, repr(text)


def test_every_document_parses_strictly_and_validates(llm):
    cases = [(name, schema, seed) for name, schema in SCHEMAS.items() for seed in SEEDS]
    params = [SamplingParams(temperature=1.0, seed=seed, n=4, max_tokens=120,
                             structured_outputs=StructuredOutputsParams(json=schema, disable_any_whitespace=True))
              for _, schema, seed in cases]
    outputs = llm.generate(["JSON:"] * len(cases), params, use_tqdm=False)
    finished = 0
    for (name, schema, _), output in zip(cases, outputs):
        for choice in output.outputs:
            if choice.finish_reason != "stop":
                continue
            finished += 1
            document = json.loads(choice.text)  # strict: no raw control characters inside strings
            jsonschema.validate(document, schema, format_checker=jsonschema.FormatChecker())
    assert finished >= 0.8 * 4 * len(cases)


def test_strings_hold_escapes_where_the_backend_writes_them(llm):
    """The model's taste for backslashes shows in plain strings: escapes are written and read back."""
    so = StructuredOutputsParams(json=SCHEMAS["plain strings"], disable_any_whitespace=True)
    outputs = llm.generate(["JSON:"], SamplingParams(temperature=1.0, seed=3, n=4, max_tokens=120,
                                                     structured_outputs=so), use_tqdm=False)[0].outputs
    assert any("\\" in choice.text for choice in outputs)
