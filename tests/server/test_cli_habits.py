"""vLLM users' command-line habits: `serve MODEL`, the port bound first, a fast --help, clear path errors."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from asyncserve.cli import build_parser, main, parse_args
from asyncserve.config import looks_like_path

from tests.server.test_cli import _free_port, _wait_healthy

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncserve.cli", *args]


@pytest.mark.asyncio(loop_scope="session")
async def test_serve_model_positional_serves_and_prints_start_up_progress_then_the_ready_line(model_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(_cli("serve", model_path, "--host", "127.0.0.1", "--port", str(port),
                                    "--trust-remote-code", "--num-gpu-blocks-override", "256"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    try:
        await _wait_healthy(url, process)
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/models") as response:
                assert [m["id"] for m in (await response.json())["data"]] == [model_path]
            async with http.get(url + "/v1/models", headers={"Origin": "http://elsewhere.example"}) as response:
                assert "Access-Control-Allow-Origin" not in response.headers  # no CORS unless asked
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.get_running_loop().run_in_executor(None, lambda: process.communicate(timeout=30))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = stderr.decode()
    assert process.returncode == 0, log
    loading = log.index("Loading weights (1 file)")
    assert "100%" in log[loading:]
    ready = log.index(f"serving {model_path} at http://127.0.0.1:{port}/v1")
    assert loading < log.index("engine ready") < ready
    assert "--trust-remote-code has no effect" in log


def test_a_port_in_use_fails_at_once_naming_it_before_loading_the_model(model_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(_cli("--model", model_path, "--host", "127.0.0.1", "--port", str(port)),
                                capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"asyncserve: error: port {port} is already in use on 127.0.0.1: stop what holds it, "
                     "or pick another --port."]


def test_help_imports_neither_torch_nor_transformers_nor_aiohttp():
    code = ("import sys\nfrom asyncserve.cli import main\ntry:\n    main(['serve', '--help'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'aiohttp') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: asyncserve [serve] [MODEL] [options]" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["serve", "some/model"], ["some/model"], ["--model", "some/model"],
                                  ["serve", "--model", "some/model"], ["serve", "some/model", "--model",
                                                                       "some/model"]])
def test_the_model_can_be_given_as_vllm_serve_takes_it_or_with_model(argv):
    parser = build_parser()
    assert parse_args(parser, argv + ["--port", "9"]).model == "some/model"


def test_two_different_models_are_refused(capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(build_parser(), ["serve", "a/b", "--model", "c/d"])
    assert caught.value.code == 2
    assert "the model is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["/no/such/model-dir", "./no-such-model", "~/no-such-model-anywhere",
                                     "tests/no-such-model", "a/b/c"])
def test_a_missing_model_path_fails_in_one_clear_line(missing, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--model", missing])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err == f"asyncserve: error: Model path {missing!r} does not exist.\n"


@pytest.mark.parametrize("name,is_path", [("Qwen/Qwen2.5-0.5B-Instruct", False), ("gpt2", False),
                                          ("/abs/dir", True), ("./rel", True), ("~/x", True),
                                          ("tests/missing", True), ("a/b/c", True)])
def test_hub_ids_are_not_mistaken_for_paths(name, is_path):
    assert looks_like_path(name) is is_path


def test_help_says_trust_remote_code_has_no_effect_and_lists_cors_and_generation_config_flags():
    text = " ".join(build_parser().format_help().split())
    assert "--trust-remote-code Accepted for compatibility with vLLM; it has no effect" in text
    for flag in ("--allowed-origins", "--allowed-methods", "--allowed-headers", "--allow-credentials",
                 "--generation-config"):
        assert flag in text


@pytest.mark.parametrize("value,expected", [('["http://a.example", "http://b.example"]',
                                             ["http://a.example", "http://b.example"]),
                                            ("http://a.example,http://b.example",
                                             ["http://a.example", "http://b.example"]),
                                            ('["*"]', ["*"]), ("*", ["*"])])
def test_cors_lists_take_vllm_json_or_commas(value, expected):
    args = parse_args(build_parser(), ["--allowed-origins", value, "--allowed-methods", value])
    assert args.allowed_origins == expected and args.allowed_methods == expected


def test_cors_is_off_unless_origins_are_given():
    assert parse_args(build_parser(), []).allowed_origins is None
