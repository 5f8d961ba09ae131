"""A download or conversion killed midway (SIGKILL included) leaves its scratch directory in the cache; the
next start removes it, but never one that a living process is still filling."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from asyncserve.config import EngineConfig
from asyncserve.checkpoints.default_model import TINY_MODEL
from asyncserve.checkpoints.scratch import remove_stale_scratch
from asyncserve.engine.resolve_config import resolve_model_path

FILLING = """
import sys, time
from asyncserve.checkpoints.scratch import scratch_dir
with scratch_dir(sys.argv[1], sys.argv[2]) as path:
    with open(path + "/model.whl", "wb") as f:
        f.write(b"0" * 100_000)
    print(path, flush=True)
    time.sleep(600)
"""
HOURS_AGO = time.time() - 2 * 3600


def _filling(parent: str, name: str) -> tuple[subprocess.Popen, str]:
    """A process filling a scratch directory of `parent`; (the process, the directory)."""
    process = subprocess.Popen([sys.executable, "-c", FILLING, parent, name], stdout=subprocess.PIPE, text=True)
    return process, process.stdout.readline().strip()


def _aged(path: str) -> str:
    os.utime(path, (HOURS_AGO, HOURS_AGO))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("ASYNCSERVE_CACHE_DIR", str(tmp_path))
    return str(tmp_path)


def test_the_next_start_removes_what_a_killed_download_and_conversion_left(cache):
    process, killed = _filling(cache, "smollm2-download")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert os.path.isdir(killed)  # SIGKILL runs no cleanup
    older = os.path.join(cache, ".smollm2-download-k2j4h5")  # the name before scratch directories were locked
    conversion = os.path.join(cache, ".SmolLM2-135M-Instruct-Q4_1-v1.tmp-8fj3k2")
    gguf = os.path.join(cache, "gguf", ".model-0123456789ab.tmp-x1y2z3")
    for path in (older, conversion, gguf):
        os.makedirs(path)
        with open(os.path.join(path, "model.safetensors"), "wb") as f:
            f.write(b"0" * 100_000)
    for path in (killed, older, conversion, gguf):
        _aged(path)
    kept = os.path.join(cache, "SmolLM2-135M-Instruct-Q4_1-v1")  # a finished directory is never scratch
    os.makedirs(kept)

    path = resolve_model_path(EngineConfig(model=TINY_MODEL, device="cpu"))  # what `asyncserve` resolves at start

    assert sorted(os.listdir(cache)) == sorted(["SmolLM2-135M-Instruct-Q4_1-v1", "gguf", os.path.basename(path)])
    assert os.listdir(os.path.join(cache, "gguf")) == []


def test_a_scratch_directory_that_a_living_process_fills_is_left_alone(cache):
    process, filling = _filling(cache, "model")
    try:
        assert remove_stale_scratch(cache) == []  # locked, however old it looks
        _aged(filling)
        assert remove_stale_scratch(cache) == []
        assert os.listdir(filling) == ["model.whl"]
    finally:
        process.kill()
        process.wait()
    assert remove_stale_scratch(cache) == [filling]  # its owner is gone


def test_a_scratch_directory_younger_than_a_minute_is_left_alone(cache):
    just_made = os.path.join(cache, ".model.tmp-a1b2c3")  # as mkdtemp makes it, an instant before its lock
    os.makedirs(just_made)
    assert remove_stale_scratch(cache) == []
    assert remove_stale_scratch(cache) == [] and os.path.isdir(just_made)
    _aged(just_made)
    assert remove_stale_scratch(cache) == [just_made]
    assert not os.path.exists(just_made)
