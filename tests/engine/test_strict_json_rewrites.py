"""What xgrammar is handed: a schema's patterns restricted to strings JSON can carry raw (no control character,
quote or backslash; every string matched is matched by the original pattern too, as validators read it),
string rules it would drop refused, and its EBNF's string characters made strict."""
from __future__ import annotations

import itertools
import re

import pytest

from asyncserve.engine.structured.safe_regex import UnsupportedPattern, length_pattern, safe_pattern
from asyncserve.engine.structured.xgrammar_schema import SchemaError, strict_string_classes, xgrammar_schema

ALPHABET = ["a", "b", "Z", "1", "_", " ", "-", "@", ".", "é", "٣", "\u2028", "\u00a0", "\x85", "\n", "\t", "\x01",
            '"', "\\"]
PATTERNS = ["^.{1,3}$", "[^a]+", "^[ -~]{1,3}$", r"^(a|\n)+$", r"\d-\d", r"^\S+$", r"^\w+@\w+$", r"^[\s\S]{0,3}$",
            "^(?:ab|)Z$", "ab1|^Z_a$", "^(1|Z)?a$", r"^\W\D$", r"^[\u0000-\u007f]{2}$", "x*", "", "a{0}",
            r'[^\\"]', r"^\s+$"]


def _unsafe(text: str) -> bool:
    return any(ord(char) < 0x20 or char in '"\\' for char in text)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_the_safe_pattern_matches_a_subset_without_characters_json_escapes(pattern):
    safe, original = re.compile(safe_pattern(pattern)), re.compile(pattern)
    matched = 0
    for size in range(4):
        for text in map("".join, itertools.product(ALPHABET, repeat=size)):
            if safe.fullmatch(text):
                matched += 1
                assert original.search(text) and not _unsafe(text), (pattern, text)
    assert matched > 0


def test_only_what_json_can_carry_raw_is_kept():
    assert re.fullmatch(safe_pattern("^[ -~]{2}$"), "ab") and not re.fullmatch(safe_pattern("^[ -~]{2}$"), 'a"')
    assert safe_pattern(r"^(a|\n)+$") == "^a+$"
    lengths = re.compile(length_pattern(2, 4))
    assert lengths.fullmatch("ab") and lengths.fullmatch("é٣\u2028") and not lengths.fullmatch("abcde")
    assert not lengths.fullmatch("a\x16") and not lengths.fullmatch('a"') and not lengths.fullmatch("a\\")


@pytest.mark.parametrize("pattern,words", [
    (r"^a\n$", "must escape"), ('^"$', "must escape"), ("(?i)abc", "flags"), ("a(?=b)", "lookarounds"),
    (r"(a)\1", "backreferences"), (r"^a\b", "anchors"), ("(unclosed", "not a regular expression"),
    ("(" * 2000 + ")" * 2000, "nests too deeply"),
])
def test_what_cannot_be_rewritten_is_refused_saying_why(pattern, words):
    with pytest.raises(UnsupportedPattern, match=words):
        safe_pattern(pattern)


@pytest.mark.parametrize("node,words", [
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "cannot combine 'pattern' with ['maxLength']"),
    ({"type": "string", "format": "date", "minLength": 3}, "cannot combine 'format' with ['minLength']"),
    ({"type": "string", "format": "date", "pattern": "^1"}, "cannot combine 'pattern' with 'format'"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "no string fits"),
    ({"type": "string", "maxLength": "3"}, "non-negative integer"),
])
def test_string_rules_xgrammar_would_ignore_are_refused(node, words):
    with pytest.raises(SchemaError, match=re.escape(words)):
        xgrammar_schema({"type": "object", "properties": {"x": node}})


def test_xgrammar_gets_safe_patterns_in_every_subschema_and_the_schema_is_left_alone():
    schema = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^[ -~]{1,3}$"}},
              "$defs": {"d": {"type": ["string", "null"], "minLength": 1}},
              "propertyNames": {"maxLength": 2}, "patternProperties": {"^[ -~]+$": {"type": "integer"}},
              "not": {"type": "string", "pattern": "^[ -~]$"}}
    rewritten = xgrammar_schema(schema)
    assert rewritten["properties"]["a"] == {"type": "string", "pattern": safe_pattern("^[ -~]{1,3}$")}
    assert rewritten["$defs"]["d"] == schema["$defs"]["d"]  # lengths stay xgrammar's (strict_string_classes)
    assert rewritten["propertyNames"] == {"type": "string", "maxLength": 2}  # a type, or xgrammar drops it
    assert list(rewritten["patternProperties"]) == [safe_pattern("^[ -~]+$")]
    assert rewritten["not"] == schema["not"]  # restricting what `not` excludes would widen the document
    assert schema["properties"]["a"] == {"type": "string", "pattern": "^[ -~]{1,3}$"}
    assert xgrammar_schema(schema, lengths_as_patterns=True)["$defs"]["d"] == {
        "type": ["string", "null"], "pattern": length_pattern(1, None)}


def test_negated_classes_of_xgrammars_ebnf_exclude_what_json_escapes_and_literals_are_kept():
    ebnf = 'a ::= [^\\"\\\\\\r\\n]{0, 12} "[^x]" Regex("^[^a]$", json_string=true) [a-z\\]]'
    assert strict_string_classes(ebnf) == (
        'a ::= [^\\0-\\x1f\\"\\\\\\"\\\\\\r\\n]{0, 12} "[^x]" Regex("^[^a]$", json_string=true) [a-z\\]]')
