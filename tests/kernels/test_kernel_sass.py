"""The int4 kernels' hot loops as compiled for Hopper (scripts/kernel_sass.py: the installed Triton's sm_90a
code generation, no GPU needed): the properties their speed rests on, which a change can lose silently."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "kernel_sass.py"


def _analyse(*args: str) -> dict:
    """The script in its own process: the test session interprets Triton kernels, which cannot compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), *args, "--json"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_one_row_gemv_unpacks_cheaply_and_sums_after_the_loop():
    """Codes as 2**bits + q (one shift, one mask-and-or) and the K sum after the loop: about five instructions
    per code (over seven before) and no shuffle or barrier inside it."""
    result = _analyse("gemv", "--tile", "32", "64", "4", "4", "3")
    counts = result["counts"]
    assert "SHFL" not in counts and not any(op.startswith("BAR") for op in counts)
    assert result["per_code"] < 6.0
    assert result["stack"] == 0


def test_tensor_core_product_has_no_sum_of_x_and_pipelines_reordered_x():
    """At 64 rows the zero point comes off the codes (packed subtractions), not off a per-tile sum of x (which
    cost over 9 instructions per code); reordered x reaches shared memory by asynchronous copies, not by stores."""
    result = _analyse("mma", "--tile", "64", "64", "1", "4", "3", "--permute-x")
    counts = result["counts"]
    assert counts.get("HADD2", 0) > 0 and counts.get("LDGSTS", 0) > 0 and "STS" not in counts
    assert sum(n for op, n in counts.items() if op.startswith("HGMMA")) == 8  # one MMA per code position
    assert result["per_code"] < 8.0
