"""What every grammar backend does alike with a constraint before its engine sees it: the JSON schema
parsed (and closed when asked), a choice list as a regex, and errors worded for the user."""
from __future__ import annotations

import copy
import json
import re

from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import MAX_JSON_DEPTH, StructuredOutputsParams, json_too_deep


def json_schema(params: StructuredOutputsParams) -> dict:
    """The schema as a dict (the caller's: not to be changed), objects closed in a copy when
    disable_additional_properties asks for it."""
    schema = params.json
    if isinstance(schema, str):
        too_deep = constraint_error(params, f"the JSON schema nests deeper than {MAX_JSON_DEPTH} levels.")
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise constraint_error(params, f"the JSON schema is not valid JSON: {exc}") from None
        except RecursionError:
            raise too_deep from None
        if isinstance(schema, (dict, list)) and json_too_deep(schema):
            raise too_deep
    if not isinstance(schema, dict):
        raise constraint_error(params, "the JSON schema must be a JSON object.")
    return _closed_objects(copy.deepcopy(schema)) if params.disable_additional_properties else schema


def _closed_objects(node):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed_objects(value)
    elif isinstance(node, list):
        for value in node:
            _closed_objects(value)
    return node


def choice_regex(choices: list[str]) -> str:
    return "(" + "|".join(re.escape(choice) for choice in choices) + ")"


_NAMES = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
          "json_object": "JSON object", "structural_tag": "structural tag"}
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def constraint_error(params: StructuredOutputsParams, detail: str) -> InvalidParameterError:
    """A 400-shaped error: which constraint, and the grammar engine's words for what is wrong."""
    detail = _NATIVE_PREFIX.sub("", str(detail).strip()).strip()
    return InvalidParameterError(f"Invalid {_NAMES[params.kind]} for structured outputs: {detail}",
                                 f"structured_outputs.{params.kind}")
