"""Regexes for the inside of a JSON string that a grammar engine can copy character for character.

xgrammar writes what a schema's `pattern` (or `minLength`/`maxLength`) matches into the JSON string raw:
a pattern that allows a control character, `"` or `\\` yields output that strict JSON parsers refuse (a
raw control character, a quote that ends the string early). `safe_pattern` rewrites a pattern into one
that matches a subset of its strings, none holding such a character, so raw and JSON-encoded text are the
same; it mentions no character that needs an escape, so it stays right whether or not a grammar engine
escapes for itself. Every character class is spelled out as code-point ranges, the ones Python's `re`
(what validators use) and ECMA-262 (JSON Schema's regex dialect) agree on.
"""
from __future__ import annotations

import functools
import sys

if sys.version_info >= (3, 11):
    from re import _constants as sre, _parser as sre_parse
else:  # pragma: no cover - Python 3.10
    import sre_constants as sre
    import sre_parse

MAX_CODE_POINT = 0x10FFFF
Ranges = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive code-point ranges

# What may not appear raw inside a JSON string (RFC 8259: controls, quote, backslash), and surrogates,
# which UTF-8 text cannot hold; `.` also excludes ECMA's line terminators U+2028 and U+2029.
_UNSAFE: Ranges = ((0x00, 0x1F), (ord('"'), ord('"')), (ord("\\"), ord("\\")), (0xD800, 0xDFFF))
_LINE_TERMINATORS: Ranges = ((0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029))
# ECMA-262 WhiteSpace and LineTerminator, what `\s` means in JSON Schema.
_ECMA_SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                       (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000), (0xFEFF, 0xFEFF))
_ASCII_DIGIT: Ranges = ((0x30, 0x39),)
_ASCII_WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
_METACHARACTERS = frozenset("\\^$.|?*+()[]{}/-")
_SURROGATES = range(0xD800, 0xE000)


class UnsupportedPattern(ValueError):
    """The pattern uses something that cannot be rewritten (its message says what)."""


# ---- code-point sets ------------------------------------------------------------------------------

def _normalize(ranges) -> Ranges:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _union(*sets: Ranges) -> Ranges:
    return _normalize([r for ranges in sets for r in ranges])


def _complement(ranges: Ranges) -> Ranges:
    out, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        out.append((start, MAX_CODE_POINT))
    return tuple(out)


def _subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    return _complement(_union(_complement(ranges), removed))


@functools.cache
def _python_class(predicate: str) -> Ranges:
    """Code points where `str.<predicate>()` holds: what Python's `re` means by \\d, \\w, \\s on text."""
    test = getattr(str, predicate)
    extra = {ord("_")} if predicate == "isalnum" else set()
    out: list[tuple[int, int]] = []
    for cp in range(MAX_CODE_POINT + 1):
        if cp in extra or test(chr(cp)):
            if out and out[-1][1] == cp - 1:
                out[-1] = (out[-1][0], cp)
            else:
                out.append((cp, cp))
    return tuple(out)


def _category(category) -> Ranges:
    """A class escape as the characters both dialects put in it: ASCII for \\d and \\w (ECMA), Python's
    Unicode sets for what \\D and \\W leave out; \\s and \\S likewise."""
    if category == sre.CATEGORY_DIGIT:
        return _ASCII_DIGIT
    if category == sre.CATEGORY_NOT_DIGIT:
        return _complement(_union(_ASCII_DIGIT, _python_class("isdecimal")))
    if category == sre.CATEGORY_WORD:
        return _ASCII_WORD
    if category == sre.CATEGORY_NOT_WORD:
        return _complement(_union(_ASCII_WORD, _python_class("isalnum")))
    python_space = _python_class("isspace")
    if category == sre.CATEGORY_SPACE:
        return _complement(_union(_complement(_ECMA_SPACE), _complement(python_space)))
    if category == sre.CATEGORY_NOT_SPACE:
        return _complement(_union(_ECMA_SPACE, python_space))
    raise UnsupportedPattern(f"the class escape {category} is not supported")


# ---- a small regex tree: ("set", ranges) | ("seq", items) | ("alt", items) | ("rep", item, lo, hi) ------

NEVER = ("alt", ())   # matches nothing
EMPTY = ("seq", ())   # matches the empty string


def _set(ranges: Ranges):
    ranges = _subtract(ranges, _UNSAFE)
    return ("set", ranges) if ranges else NEVER


def _seq(items):
    flat = []
    for item in items:
        if item == NEVER:
            return NEVER
        flat.extend(item[1] if item[0] == "seq" else [item])
    if not flat:
        return EMPTY
    return flat[0] if len(flat) == 1 else ("seq", tuple(flat))


def _alt(items):
    kept = [item for item in items if item != NEVER]
    if not kept:
        return NEVER
    if EMPTY in kept:  # (a|) is a?
        rest = [item for item in kept if item != EMPTY]
        return _rep(_alt(rest), 0, 1) if rest else EMPTY
    return kept[0] if len(kept) == 1 else ("alt", tuple(kept))


def _rep(item, lo: int, hi: int | None):
    if item == NEVER:
        return EMPTY if lo == 0 else NEVER
    if item == EMPTY or hi == 0:
        return EMPTY
    if lo == hi == 1:
        return item
    return ("rep", item, lo, hi)


def _tree(parsed, flags: int):
    if flags & (sre.SRE_FLAG_IGNORECASE | sre.SRE_FLAG_MULTILINE | sre.SRE_FLAG_LOCALE):
        raise UnsupportedPattern("inline flags such as (?i) or (?m) are not part of JSON Schema patterns")
    return _seq([_node(op, av, flags) for op, av in parsed])


def _node(op, av, flags: int):
    if op == sre.LITERAL:
        return _set(((av, av),))
    if op == sre.NOT_LITERAL:
        return _set(_complement(((av, av),)))
    if op == sre.ANY:
        return _set(_complement(_LINE_TERMINATORS))
    if op == sre.IN:
        return _set(_class(av))
    if op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # lazy or greedy: the same strings
        lo, hi, sub = av
        return _rep(_tree(sub, flags), lo, None if hi == sre.MAXREPEAT else hi)
    if op == sre.SUBPATTERN:
        _, add_flags, _, sub = av
        return _tree(sub, flags | add_flags)
    if op == sre.BRANCH:
        return _alt([_tree(sub, flags) for sub in av[1]])
    if op == sre.CATEGORY:
        return _set(_category(av))
    if op == sre.AT:
        raise UnsupportedPattern("anchors (^, $, \\b) are only supported at the start and end of a pattern")
    names = {sre.GROUPREF: "backreferences", sre.ASSERT: "lookarounds", sre.ASSERT_NOT: "lookarounds",
             sre.GROUPREF_EXISTS: "conditional groups", getattr(sre, "ATOMIC_GROUP", None): "atomic groups",
             getattr(sre, "POSSESSIVE_REPEAT", None): "possessive quantifiers"}
    raise UnsupportedPattern(f"{names.get(op, str(op).lower())} are not supported in patterns")


def _class(items) -> Ranges:
    negate = bool(items) and items[0][0] == sre.NEGATE
    ranges = []
    for op, av in items[1:] if negate else items:
        if op == sre.LITERAL:
            ranges.append((av, av))
        elif op == sre.RANGE:
            ranges.append(av)
        elif op == sre.CATEGORY:
            ranges.extend(_category(av))
        else:
            raise UnsupportedPattern(f"{str(op).lower()} is not supported inside a character class")
    ranges = _normalize(ranges)
    return _complement(ranges) if negate else ranges


def _strip_anchors(parsed) -> list:
    """The top-level items without a leading ^ / \\A and a trailing $ / \\Z (in each top-level branch)."""
    items = list(parsed)
    if len(items) == 1 and items[0][0] == sre.BRANCH:
        return [(sre.BRANCH, (None, [_strip_anchors(sub) for sub in items[0][1][1]]))]
    if items and items[0] in ((sre.AT, sre.AT_BEGINNING), (sre.AT, sre.AT_BEGINNING_STRING)):
        items = items[1:]
    if items and items[-1] in ((sre.AT, sre.AT_END), (sre.AT, sre.AT_END_STRING)):
        items = items[:-1]
    return items


# ---- back to regex text ---------------------------------------------------------------------------

def _char(cp: int) -> str:
    if cp < 0x20 or cp == 0x7F:
        return f"\\x{cp:02x}"
    if cp in _SURROGATES:  # only ever excluded (in a negated class); not text that JSON can carry raw
        return f"\\u{cp:04x}"
    char = chr(cp)
    return "\\" + char if char in _METACHARACTERS else char


def _emit_set(ranges: Ranges) -> str:
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return _char(ranges[0][0])
    negated = _complement(ranges)
    negate = len(negated) < len(ranges)
    body = "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}"
                   for lo, hi in (negated if negate else ranges))
    return f"[^{body}]" if negate else f"[{body}]"


def _emit(node) -> str:
    kind = node[0]
    if kind == "set":
        return _emit_set(node[1])
    if kind == "seq":
        return "".join(f"(?:{_emit(item)})" if item[0] == "alt" else _emit(item) for item in node[1])
    if kind == "alt":
        return "|".join(_emit(item) for item in node[1])
    _, item, lo, hi = node
    inner = _emit(item)
    if item[0] != "set":
        inner = f"(?:{inner})"
    bound = ("*" if lo == 0 else "+" if lo == 1 else f"{{{lo},}}") if hi is None else (
        "?" if (lo, hi) == (0, 1) else f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}")
    return inner + bound


def _anchored(node) -> str:
    body = _emit(node)
    return f"^(?:{body})$" if node[0] == "alt" else f"^{body}$"


def safe_pattern(pattern: str) -> str:
    """`pattern`, matched as a whole, restricted to strings without characters JSON must escape.

    Raises UnsupportedPattern when the pattern is not a regex Python reads, uses what cannot be rewritten
    (lookarounds, backreferences, inner anchors, flags), or only matches strings that need escapes.
    """
    try:
        parsed = sre_parse.parse(pattern)
    except (sre.error, OverflowError) as exc:
        raise UnsupportedPattern(f"not a regular expression: {exc}") from None
    except RecursionError:
        raise UnsupportedPattern("it nests too deeply") from None
    try:
        node = _tree(_strip_anchors(parsed), parsed.state.flags)
    except RecursionError:
        raise UnsupportedPattern("it nests too deeply") from None
    if node == NEVER:
        raise UnsupportedPattern("it only matches strings holding characters that JSON must escape (control "
                                 "characters, '\"' or '\\'), which this backend cannot generate in a pattern")
    return _anchored(node)


def length_pattern(min_length: int, max_length: int | None) -> str:
    """Any string of min_length to max_length characters, none of which JSON must escape."""
    return _anchored(_rep(_set(((0, MAX_CODE_POINT),)), min_length, max_length))
