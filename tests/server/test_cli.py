"""`asyncserve` on the command line: serves, stops cleanly on SIGINT, refuses unbuilt features with exit 2."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from asyncserve.cli import build_parser, engine_config, main

STARTUP_TIMEOUT = 90.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    deadline = asyncio.get_running_loop().time() + STARTUP_TIMEOUT
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            assert process.poll() is None, process.stderr.read().decode()
            try:
                async with http.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("the server did not become healthy")


@pytest.mark.asyncio(loop_scope="session")
async def test_cli_serves_then_exits_0_on_sigint_ending_streams_cleanly(model_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [sys.executable, "-m", "asyncserve.cli", "--model", model_path, "--host", "127.0.0.1", "--port",
         str(port), "--served-model-name", "tiny", "alias", "--num-gpu-blocks-override", "256",
         "--shutdown-timeout", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        await _wait_healthy(url, process)
        from openai import AsyncOpenAI
        async with AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client:
            assert [m.id for m in (await client.models.list()).data] == ["tiny", "alias"]
            result = await client.completions.create(model="alias", prompt="Hello", max_tokens=4,
                                                     extra_body={"ignore_eos": True})
            assert result.usage.completion_tokens == 4
        async with aiohttp.ClientSession() as http:
            body = {"model": "tiny", "prompt": "Long", "max_tokens": 1500, "ignore_eos": True, "stream": True}
            async with http.post(url + "/v1/completions", json=body) as response:
                await response.content.readuntil(b"\n\n")
                process.send_signal(signal.SIGINT)
                rest = await response.content.read()
        assert rest.endswith(b"data: [DONE]\n\n")  # the stream ended cleanly, not cut
        assert b'"finish_reason":"abort"' in rest or b'"finish_reason":"length"' in rest
        _, stderr = await asyncio.get_running_loop().run_in_executor(None, lambda: process.communicate(timeout=30))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert f"serving tiny, alias at http://127.0.0.1:{port}/v1 (chat page: http://127.0.0.1:{port}/" in log
    assert "Traceback" not in log


@pytest.mark.parametrize("flags,message", [
    (["--tensor-parallel-size", "0"], "tensor_parallel_size must be >= 1"),
    (["--quantization", "squeezellm"], "quantization"),
    (["--kv-cache-dtype", "int8"], "kv_cache_dtype='int8' is not supported (supported: 'auto'"),
    (["--kv-cache-dtype", "fp8_e5m2"], "use 'fp8' (e4m3"),
    (["--chat-template", "no-such-file.jinja"], "chat-template"),
    (["--block-size", "24"], "block-size"),
])
def test_unbuilt_or_invalid_settings_exit_2_with_a_message(flags, message, capsys):
    with pytest.raises(SystemExit) as caught:
        main(flags)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_help_lists_vllm_flag_names_in_groups():
    text = build_parser().format_help()
    for flag in ("--model", "--host", "--port", "--served-model-name", "--dtype", "--max-model-len",
                 "--gpu-memory-utilization", "--max-num-seqs", "--max-num-batched-tokens", "--block-size",
                 "--seed", "--api-key", "--chat-template", "--max-logprobs", "--num-gpu-blocks-override",
                 "--enforce-eager", "--tensor-parallel-size", "--quantization", "--kv-cache-dtype",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--enable-chunked-prefill",
                 "--no-enable-chunked-prefill", "--swap-space", "--disable-log-requests", "--load-format",
                 "--device", "--max-num-waiting"):
        assert flag in text, flag
    for group in ("model:", "HTTP server:", "KV cache:", "scheduler:"):
        assert group in text


def test_mamba_ssm_cache_dtype_flag_reaches_the_engine_config():
    parser = build_parser()
    assert engine_config(parser.parse_args(["--model", "m"])).mamba_ssm_cache_dtype == "auto"
    args = parser.parse_args(["--model", "m", "--mamba-ssm-cache-dtype", "float32"])
    assert engine_config(args).mamba_ssm_cache_dtype == "float32"


@pytest.mark.skipif(shutil.which("asyncserve") is None, reason="package not installed")
def test_entry_point_is_installed():
    result = subprocess.run(["asyncserve", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "OpenAI-compatible" in result.stdout
