"""The benchmarks' realistic structured-output workload: a 10-field JSON schema (nested object, array, enum,
patterns, ranges) and random documents that satisfy it."""
from __future__ import annotations

import json
import random

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 1000000},
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,15} [A-Z][a-z]{1,15}$"},
        "email": {"type": "string", "pattern": "^[a-z]{3,10}@[a-z]{3,8}\\.(com|org|net)$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "active": {"type": "boolean"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{2,10}$"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string", "pattern": "^[0-9]{1,4} [A-Z][a-z]{2,12} St$"},
                           "city": {"type": "string", "pattern": "^[A-Z][a-z]{2,12}$"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "note": {"type": "string", "pattern": "^[a-z ]{0,40}$"},
    },
    "required": ["id", "name", "email", "age", "role", "active", "score", "tags", "address", "note"],
    "additionalProperties": False,
}


def _word(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(low, high)))


def random_document(rng: random.Random) -> str:
    """One document of SCHEMA as a model would write it (`json.dumps`' default separators)."""
    doc = {
        "id": rng.randint(1, 1000000),
        "name": f"{_word(rng, 2, 8).title()} {_word(rng, 2, 10).title()}",
        "email": f"{_word(rng, 3, 10)}@{_word(rng, 3, 8)}.{rng.choice(['com', 'org', 'net'])}",
        "age": rng.randint(0, 120),
        "role": rng.choice(["admin", "editor", "viewer", "guest"]),
        "active": rng.random() < 0.5,
        "score": round(rng.uniform(0, 100), 2),
        "tags": [_word(rng, 2, 10) for _ in range(rng.randint(0, 5))],
        "address": {"street": f"{rng.randint(1, 9999)} {_word(rng, 3, 12).title()} St",
                    "city": _word(rng, 3, 12).title(), "zip": f"{rng.randint(0, 99999):05d}"},
        "note": " ".join(_word(rng, 2, 6) for _ in range(rng.randint(0, 5)))[:40].strip(),
    }
    return json.dumps(doc)
