"""Tool-call parsers by vLLM's `--tool-call-parser` names; a new format plugs in with `@register(name)`."""
from __future__ import annotations

from asyncserve.utils.named_registry import NamedRegistry

_REGISTRY = NamedRegistry("tool-call parser")
register = _REGISTRY.register


def tool_parser_names() -> list[str]:
    _load_builtin()
    return _REGISTRY.names()


def get_tool_parser(name: str) -> type:
    """The parser class for `name`; KeyError names the known ones."""
    _load_builtin()
    return _REGISTRY.get(name)


def _load_builtin() -> None:
    """Imports every module of this package once: a parser file registers itself, nothing lists it."""
    import importlib
    import pkgutil

    import asyncserve.parsers.tool_calls as package
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")
