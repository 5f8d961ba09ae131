"""Structured outputs: grammars compiled from JSON schemas, regexes, choices or EBNF, and the per-step
token bitmask of every constrained sequence (see manager.py)."""
from asyncserve.engine.structured.backend import GrammarBackend, GrammarMatcher
from asyncserve.engine.structured.factory import BACKENDS, make_backend
from asyncserve.engine.structured.manager import StructuredOutputManager

__all__ = ["BACKENDS", "GrammarBackend", "GrammarMatcher", "StructuredOutputManager", "make_backend"]
