"""The JSON grammar as xgrammar is given it: strings that strict JSON parsers accept, and string rules
xgrammar would drop refused rather than broken.

xgrammar (0.2) writes what a string's `minLength`/`maxLength` or `pattern` allows raw, without escapes:
control characters, `"` and `\\` come out as they are, which `json.loads` refuses. It also ignores the
length bounds next to a `pattern` or `format`, the `pattern` next to a `format`, and string rules on a
schema without a `type`. So, before xgrammar sees a schema: every `pattern` (and `patternProperties` key)
becomes a regex that cannot produce a character JSON must escape (safe_regex.py), and what xgrammar would
ignore is refused. After xgrammar has turned the schema into its EBNF grammar: every negated character
class (in a JSON grammar, the characters of a string) also excludes control characters, `"` and `\\`
(`strict_string_classes`); xgrammar then compiles that grammar, with its fast repetition for length bounds.
What the model may write is a subset of what the schema allows, whatever xgrammar's own conversion does;
llguidance gets the schema as it is (it escapes and combines rules).
"""
from __future__ import annotations

import json
import re

from asyncserve.engine.structured.safe_regex import UnsupportedPattern, length_pattern, safe_pattern
from asyncserve.sampling_params import MAX_JSON_DEPTH, json_too_deep

# Where a subschema's values are among the document's: restricting it restricts the document. `not` and `if`
# are left as written (restricting them would widen what they allow).
_SUBSCHEMA = ("additionalProperties", "additionalItems", "items", "contains", "propertyNames", "then", "else",
              "unevaluatedProperties", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_STRING_RULES = ("pattern", "minLength", "maxLength", "format")


class SchemaError(ValueError):
    """What in the schema xgrammar cannot follow, with where it is (a JSON pointer)."""


def xgrammar_schema(schema: dict, lengths_as_patterns: bool = False) -> dict:
    """A rewritten copy of `schema` (which it does not change); raises SchemaError. With
    `lengths_as_patterns`, length bounds become patterns too (where no EBNF passes through our hands:
    structural tags); xgrammar compiles those much more slowly than its own length rule."""
    try:
        return _rewrite(schema, "#", lengths_as_patterns)
    except RecursionError:
        raise SchemaError("the schema nests too deeply") from None


def strict_string_classes(ebnf: str) -> str:
    """xgrammar's EBNF with control characters, `"` and `\\` added to every negated character class
    outside string literals (the `Regex("...")` of a pattern is a literal: safe_regex made it safe)."""
    return _LITERAL_OR_CLASS.sub(_strict_class, ebnf)


# A string literal or a character class of xgrammar's EBNF, backslash escapes inside either.
_LITERAL_OR_CLASS = re.compile(r'"(?:[^"\\]|\\.)*"|\[(?:[^\]\\]|\\.)*\]', re.DOTALL)


def _strict_class(match: re.Match) -> str:
    text = match.group()
    return '[^\\0-\\x1f\\"\\\\' + text[2:] if text.startswith("[^") else text


def xgrammar_structural_tag(text: str) -> str:
    """A structural tag's JSON text with each JSON schema in it (`schema` of a tag, `json_schema` of a
    format whose style is JSON) rewritten as `xgrammar_schema` does; text that is not JSON stays as it is
    (xgrammar names the problem)."""
    too_deep = SchemaError(f"the structural tag nests deeper than {MAX_JSON_DEPTH} levels.")
    try:
        tag = json.loads(text)
    except ValueError:
        return text
    except RecursionError:
        raise too_deep from None
    if isinstance(tag, (dict, list)) and json_too_deep(tag):
        raise too_deep
    return json.dumps(_rewrite_tag(tag, "structural_tag"))


def _rewrite_tag(node, where: str):
    if isinstance(node, list):
        return [_rewrite_tag(item, f"{where}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    node = {key: _rewrite_tag(value, f"{where}.{key}") for key, value in node.items()}
    if {"begin", "end"} <= node.keys() and isinstance(node.get("schema"), dict):
        node["schema"] = _rewrite(node["schema"], f"{where}.schema#", True)
    if (node.get("type") == "json_schema" and isinstance(node.get("json_schema"), dict)
            and node.get("style", "json") == "json"):
        node["json_schema"] = _rewrite(node["json_schema"], f"{where}.json_schema#", True)
    return node


def _rewrite(node, where: str, lengths_as_patterns: bool):
    if not isinstance(node, dict):
        return node
    node = dict(node)
    for key in _SUBSCHEMA:
        if isinstance(node.get(key), dict):
            node[key] = _rewrite(node[key], f"{where}/{key}", lengths_as_patterns)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            node[key] = [_rewrite(item, f"{where}/{key}/{i}", lengths_as_patterns)
                         for i, item in enumerate(node[key])]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            node[key] = {name: _rewrite(sub, f"{where}/{key}/{name}", lengths_as_patterns)
                         for name, sub in node[key].items()}
    if isinstance(node.get("patternProperties"), dict):  # xgrammar matches property names with these regexes
        node["patternProperties"] = {
            _pattern(name, f"{where}/patternProperties"):
                _rewrite(sub, f"{where}/patternProperties/{name}", lengths_as_patterns)
            for name, sub in node["patternProperties"].items()}
    if any(rule in node for rule in _STRING_RULES) and _may_be_string(node):
        _string_rules(node, where, lengths_as_patterns)
    return node


def _may_be_string(node: dict) -> bool:
    kind = node.get("type")
    if kind is None:
        if "enum" in node or "const" in node:
            return False  # the listed values are what xgrammar writes (escaped)
        node["type"] = "string"  # xgrammar skips string rules without a type; a string is one valid value
        return True
    return kind == "string" or (isinstance(kind, list) and "string" in kind)


def _string_rules(node: dict, where: str, lengths_as_patterns: bool) -> None:
    lengths = [rule for rule in ("minLength", "maxLength") if rule in node]
    for rule in lengths:
        value = node[rule]
        if type(value) is not int or value < 0:
            raise SchemaError(f"{where}/{rule} must be a non-negative integer, got {value!r}.")
    if "pattern" in node:
        if "format" in node:
            raise SchemaError(f"{where}: xgrammar cannot combine 'pattern' with 'format' (it would ignore the "
                              "pattern); keep one, or use the guidance backend.")
        if lengths:
            raise SchemaError(f"{where}: xgrammar cannot combine 'pattern' with {lengths} (it would ignore the "
                              "lengths); put the length in the pattern, or use the guidance backend.")
        node["pattern"] = _pattern(node["pattern"], f"{where}/pattern")
    elif lengths:
        if "format" in node:
            raise SchemaError(f"{where}: xgrammar cannot combine 'format' with {lengths} (it would ignore the "
                              "lengths); keep one, or use the guidance backend.")
        low, high = node.get("minLength", 0), node.get("maxLength")
        if high is not None and low > high:
            raise SchemaError(f"{where}: minLength {low} is more than maxLength {high}: no string fits.")
        if lengths_as_patterns:
            node.pop("minLength", None), node.pop("maxLength", None)
            node["pattern"] = length_pattern(low, high)


def _pattern(pattern, where: str) -> str:
    if not isinstance(pattern, str):
        raise SchemaError(f"{where} must be a regular expression (a string), got {pattern!r}.")
    try:
        return safe_pattern(pattern)
    except UnsupportedPattern as exc:
        raise SchemaError(f"{where} {pattern!r}: {exc}.") from None
