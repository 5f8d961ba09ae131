"""A table of classes by the names users pass on the command line (`--tool-call-parser hermes`,
`--reasoning-parser qwen3`); a new one plugs in with `@registry.register(name)`."""
from __future__ import annotations

from typing import Callable


class NamedRegistry:
    def __init__(self, kind: str):
        self.kind = kind  # for the error message: "tool-call parser"
        self._classes: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            cls.name = name
            self._classes[name] = cls
            return cls
        return add

    def names(self) -> list[str]:
        return sorted(self._classes)

    def get(self, name: str) -> type:
        """The class registered as `name`; KeyError names the known ones."""
        if name not in self._classes:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._classes[name]
