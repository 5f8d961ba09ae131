"""Parsers of a model's text: tool calls and reasoning, each a plugin found by name."""
