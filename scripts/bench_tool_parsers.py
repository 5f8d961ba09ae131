"""Cost of the streaming parsers per delta (4-character deltas, as a detokenizer hands them out)."""
from __future__ import annotations

import json
import time

from asyncserve.parsers.reasoning import get_reasoning_parser
from asyncserve.parsers.tool_calls import get_tool_parser


def _per_delta(make, pieces: list[str], repeats: int = 50) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        parser = make()
        for piece in pieces:
            parser.feed(piece)
        parser.finish()
    return (time.perf_counter() - start) / repeats / len(pieces)


def _cut(text: str) -> list[str]:
    return [text[i:i + 4] for i in range(0, len(text), 4)]


def main() -> None:
    arguments = json.dumps({"items": [{"id": i, "name": f"item {i}", "tags": ["a", "b"]} for i in range(60)]})
    call = "Let me look that up. " * 10 + f'<tool_call>\n{{"name": "search", "arguments": {arguments}}}\n</tool_call>'
    plain = "word " * 2000
    print(f"hermes, a {len(call)}-char answer with a call: {_per_delta(get_tool_parser('hermes'), _cut(call)) * 1e6:.1f} us/delta")
    print(f"hermes, plain text: {_per_delta(get_tool_parser('hermes'), _cut(plain)) * 1e6:.1f} us/delta")
    print(f"qwen3 reasoning: {_per_delta(get_reasoning_parser('qwen3'), _cut('<think>' + plain)) * 1e6:.1f} us/delta")


if __name__ == "__main__":
    main()
