"""Test selection: tests of real weights (downloads of hundreds of MB, minutes of CPU) run only when the
-m expression names `real_weights`; a plain `python -m pytest` never runs or downloads them."""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _collected(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                             "tests/test_real_weights.py", *args], capture_output=True, text=True, cwd=ROOT,
                            check=False)
    return result.stdout.strip().splitlines()[-1]


def test_real_weight_tests_are_deselected_unless_asked():
    assert _collected().startswith("no tests collected (12 deselected)")
    assert _collected("-m", "real_weights").startswith("12 tests collected")
