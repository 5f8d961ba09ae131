"""Tool-call parsers by vLLM's `--tool-call-parser` names; a new format plugs in with `@register(name)`."""
from __future__ import annotations

from typing import Callable

_PARSERS: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        cls.name = name
        _PARSERS[name] = cls
        return cls
    return add


def tool_parser_names() -> list[str]:
    _load_builtin()
    return sorted(_PARSERS)


def get_tool_parser(name: str) -> type:
    """The parser class for `name`; KeyError names the known ones."""
    _load_builtin()
    if name not in _PARSERS:
        raise KeyError(f"unknown tool-call parser {name!r}; known: {', '.join(sorted(_PARSERS))}")
    return _PARSERS[name]


def _load_builtin() -> None:
    from asyncserve.tool_parsers import hermes, llama3_json  # noqa: F401  (they register themselves)
