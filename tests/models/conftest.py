"""Tiny checkpoints of the OPT / GPT-2 / Phi-3 variants, built once per session on first use."""
from __future__ import annotations

import pytest

from tests.models.tiny_families import build_variant


@pytest.fixture(scope="session")
def variant_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built: dict[str, str] = {}

    def get(variant: str) -> str:
        if variant not in built:
            built[variant] = build_variant(root / variant, variant)
        return built[variant]

    return get
