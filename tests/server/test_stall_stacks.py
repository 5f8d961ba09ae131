"""ASYNCSERVE_STALL_STACKS=FILE: a loop blocked for longer than the stall threshold shows in the file with the
function that blocked it, and the other threads' stacks beside it; unset, nothing runs."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from asyncserve.server.stall_stacks import STALL_STACKS_ENV, StallSampler
from tests.server.conftest import live_server


def _block_the_loop(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_blocked_loop_is_sampled_with_its_stack(tmp_path):
    path = tmp_path / "stalls.txt"
    sampler = StallSampler(str(path))
    sampler.start()
    await asyncio.sleep(0.05)  # healthy ticks: no stall yet
    assert sampler.num_stalls == 0
    neighbour = threading.Thread(target=_block_the_loop, args=(0.15,), name="neighbour")
    neighbour.start()
    _block_the_loop(0.08)
    await asyncio.sleep(0.02)
    await sampler.stop()
    neighbour.join()
    text = path.read_text()
    assert sampler.num_stalls == 1 and text.startswith("# 1 stalls of >= 15 ms")
    loop_part, other_part = text.split("# the other threads' stacks")
    assert "_block_the_loop" in loop_part
    assert "[neighbour]" in other_part and "_block_the_loop" in other_part


@pytest.mark.asyncio(loop_scope="session")
async def test_the_app_starts_the_sampler_from_the_environment(model_path, tmp_path, monkeypatch):
    path = tmp_path / "stalls.txt"
    monkeypatch.setenv(STALL_STACKS_ENV, str(path))
    async with live_server(model_path):
        _block_the_loop(0.05)
        await asyncio.sleep(0.02)
    assert "_block_the_loop" in path.read_text()
    assert StallSampler.from_env({}) is None
