"""Speculation in these tests runs at every step it can: they count drafts and accepted tokens and check
the paths a verify step takes, which the governor (timing-driven, tests/spec_decode/test_governor.py) would
turn off wherever plain steps happen to measure faster on the CI machine."""
import pytest

import asyncserve.config.speculative as speculative


@pytest.fixture(autouse=True)
def speculate_at_every_step(monkeypatch):
    monkeypatch.setattr(speculative, "DEFAULT_DISABLE_WHEN_SLOWER", False)
