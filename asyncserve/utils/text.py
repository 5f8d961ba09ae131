"""Text helpers shared by the streaming parsers (tool calls, reasoning)."""
from __future__ import annotations


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag` (held back until known)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0
