"""After "asyncserve stopped", the process exits at once instead of spending 1-3 s in the interpreter's
teardown (freeing torch's and the model's objects one by one), which a SIGTERM's sender waits for."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from tests.server.test_cli import _free_port, _wait_healthy

pytestmark = pytest.mark.asyncio(loop_scope="session")

# The interpreter's teardown made deliberately slow (60 s instead of torch's 1-3 s): an object whose
# finalizer sleeps, freed when the main module is torn down, after every atexit callback.
SLOW_TEARDOWN_THEN_CLI = """
import time
class SlowTeardown:
    def __del__(self, sleep=time.sleep):
        sleep(60)
slow = SlowTeardown()
from asyncserve.cli import run
run()
"""
EXIT_BOUND = 15.0  # seconds after "stopped": a liveness bound, far below the 60 s teardown


async def test_the_server_exits_without_the_interpreters_teardown_after_sigterm(model_path):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_TEARDOWN_THEN_CLI, "--model", model_path, "--host", "127.0.0.1",
         "--port", str(port), "--num-gpu-blocks-override", "256", "--disable-log-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    loop = asyncio.get_running_loop()
    try:
        await _wait_healthy(f"http://127.0.0.1:{port}", process)
        process.send_signal(signal.SIGTERM)
        log = b""
        while b"asyncserve stopped" not in log:
            line = await loop.run_in_executor(None, process.stderr.readline)
            assert line, log.decode()
            log += line
        rest = await loop.run_in_executor(None, lambda: process.communicate(timeout=EXIT_BOUND)[1])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, (log + rest).decode()
    assert b"Traceback" not in log + rest
