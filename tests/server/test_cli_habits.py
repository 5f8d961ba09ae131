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
from asyncserve.checkpoints.resolve import looks_like_path
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


# ---- vLLM flags asyncserve does not have: one line each -------------------------------------------------


@pytest.mark.parametrize("argv,lines", [
    (["--num-speculative-tokens", "4"],
     ['--num-speculative-tokens (vLLM: speculative decoding) is not built in asyncserve yet: use '
      '--speculative-config \'{"method": "ngram", "num_speculative_tokens": 4}\'.']),
    (["--enable-lora", "--fully-sharded-loras"],
     ["--fully-sharded-loras (vLLM: LoRA adapters) is not built in asyncserve yet."]),
    (["--pipeline-parallel-size", "2"],
     ["--pipeline-parallel-size (vLLM: pipeline parallelism) is not built in asyncserve yet: use "
      "--tensor-parallel-size."]),
    (["-dp", "2"],
     ["-dp (vLLM: data-parallel engine replicas) has no meaning in asyncserve: it is one engine per process; run "
      "one server per GPU (or per --tensor-parallel-size group) behind a load balancer."]),
    (["--download-dir=/data/hf"],
     ["--download-dir (vLLM: the folder weights download to) is not built in asyncserve yet: set "
      "HF_HUB_CACHE=DIR (the Hugging Face cache) instead."]),
    (["--root-path", "/llm"],
     ["--root-path (vLLM: serving under a path prefix) is not built in asyncserve yet: have the proxy strip the "
      "prefix, or mount openai_app() in your aiohttp app with add_subapp."]),
    (["--middleware", "my.module.auth"],
     ["--middleware (vLLM: ASGI middleware) has no meaning in asyncserve: it is an aiohttp app: mount "
      "openai_app() in your own aiohttp app with its middlewares."]),
    (["--mm-processor-kwargs", '{"max_pixels": 1000}'],
     ["--mm-processor-kwargs (vLLM: multimodal inputs) is not built in asyncserve yet."]),
])
def test_unbuilt_vllm_flags_are_refused_with_one_line_each_and_exit_2(argv, lines, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(build_parser(), ["serve", "some/model", *argv])
    assert caught.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"asyncserve: error: {line}" for line in lines]


def test_harmless_vllm_flags_and_neutral_values_are_accepted_with_a_note_consuming_their_values():
    from asyncserve.config.vllm_compat import flag_lines
    args = parse_args(build_parser(), [
        "serve", "some/model", "--uvicorn-log-level", "debug", "--disable-fastapi-docs", "--enable-log-requests",
        "--cudagraph-capture-sizes", "1", "2", "4", "--pipeline-parallel-size", "1", "--no-enable-lora",
        "--port", "9"])
    assert (args.model, args.port) == ("some/model", 9)
    refused, notes = flag_lines(args.vllm_flags)
    assert refused == []
    assert notes == [
        "--uvicorn-log-level (vLLM: uvicorn's log level) has no meaning in asyncserve: its HTTP server is aiohttp, "
        "not uvicorn; ignored.",
        "--disable-fastapi-docs (vLLM: FastAPI's /docs pages) has no meaning in asyncserve: asyncserve serves no "
        "API docs; ignored.",
        "--enable-log-requests (vLLM: request logging) has no meaning in asyncserve: asyncserve logs each request "
        "unless --disable-log-requests; ignored.",
        "--cudagraph-capture-sizes (vLLM: CUDA-graph sizes) has no meaning in asyncserve: asyncserve captures "
        "decode steps per batch size and mixed steps per token count (--max-cudagraph-capture-size; "
        "--enforce-eager skips both); ignored.",
        "--pipeline-parallel-size 1 (vLLM: pipeline parallelism) asks for nothing asyncserve does not already do; "
        "ignored."]
    assert args.enable_lora is False  # --no-enable-lora is asyncserve's own flag now


def test_max_cudagraph_capture_size_is_vllms_flag_and_reaches_the_model_config(tiny_model_dir):
    from asyncserve.cli import engine_config
    from asyncserve.engine.resolve_config import resolve_config
    args = parse_args(build_parser(), ["serve", tiny_model_dir("qwen3"), "--device", "cpu",
                                       "--max-cudagraph-capture-size", "512"])
    assert args.max_cudagraph_capture_size == 512 and not args.vllm_flags  # a built flag, not a note
    assert resolve_config(engine_config(args)).model.max_cudagraph_capture_size == 512
    assert parse_args(build_parser(), ["serve", "some/model"]).max_cudagraph_capture_size is None
    from asyncserve.errors import ConfigError
    negative = parse_args(build_parser(), ["serve", tiny_model_dir("qwen3"), "--device", "cpu",
                                           "--max-cudagraph-capture-size", "-1"])
    with pytest.raises(ConfigError, match="max_cudagraph_capture_size=-1"):
        resolve_config(engine_config(negative))


def test_every_table_flag_is_known_to_the_parser_hidden_from_help_and_none_shadows_a_built_flag():
    from asyncserve.config.vllm_compat import FLAGS
    parser = build_parser()
    help_text = parser.format_help()
    names = [name for flag in FLAGS for name in flag.names]
    assert len(names) == len(set(names))
    stale = [name for name in names if type(parser._option_string_actions[name]).__name__ != "_Seen"]
    assert stale == [], "built flags still listed in vllm_compat.FLAGS"
    for name in names:
        assert f"{name} " not in help_text and f"{name}," not in help_text


def test_python_dash_m_asyncserve_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "asyncserve", "serve", "--help"], capture_output=True,
                            text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: asyncserve [serve] [MODEL] [options]")


# ---- the API key: --api-key, $ASYNCSERVE_API_KEY or vLLM's $VLLM_API_KEY -------------------------------


@pytest.mark.parametrize("flag,environ,key,line", [
    (None, {}, None, "no API key (--api-key, $ASYNCSERVE_API_KEY, $VLLM_API_KEY): anyone who can reach this port "
                     "can use the API"),
    (None, {"VLLM_API_KEY": "v"}, "v", "API key from $VLLM_API_KEY: the API routes need 'Authorization: Bearer "
                                       "<key>'"),
    (None, {"VLLM_API_KEY": "v", "ASYNCSERVE_API_KEY": "a"}, "a",
     "API key from $ASYNCSERVE_API_KEY: the API routes need 'Authorization: Bearer <key>' ($VLLM_API_KEY also "
     "set, not used)"),
    ("f", {"VLLM_API_KEY": "v", "ASYNCSERVE_API_KEY": "f"}, "f",
     "API key from --api-key: the API routes need 'Authorization: Bearer <key>' ($VLLM_API_KEY also set, not "
     "used)"),
    (None, {"VLLM_API_KEY": "", "ASYNCSERVE_API_KEY": ""}, None,
     "no API key (--api-key, $ASYNCSERVE_API_KEY, $VLLM_API_KEY): anyone who can reach this port can use the API"),
])
def test_the_api_key_comes_from_the_flag_then_asyncserve_then_vllm_variable(flag, environ, key, line):
    from asyncserve.cli import resolve_api_key
    assert resolve_api_key(flag, environ) == (key, line)


@pytest.mark.asyncio(loop_scope="session")
async def test_vllm_api_key_locks_the_server_and_start_up_names_it_and_the_ignored_vllm_flags(model_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**ENV, "VLLM_API_KEY": "vllm-sekret"}
    env.pop("ASYNCSERVE_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "asyncserve", "serve", model_path, "--host", "127.0.0.1",
                                "--port", str(port), "--num-gpu-blocks-override", "128",
                                "--uvicorn-log-level", "warning", "--disable-fastapi-docs"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        await _wait_healthy(url, process)
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/v1/models") as response:
                assert response.status == 401
            async with http.get(url + "/v1/models", headers={"Authorization": "Bearer vllm-sekret"}) as response:
                assert response.status == 200
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.get_running_loop().run_in_executor(None, lambda: process.communicate(timeout=30))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = stderr.decode()
    assert process.returncode == 0, log
    assert "API key from $VLLM_API_KEY: the API routes need 'Authorization: Bearer <key>'\n" in log
    assert "--uvicorn-log-level (vLLM: uvicorn's log level) has no meaning in asyncserve" in log
    assert "--disable-fastapi-docs (vLLM: FastAPI's /docs pages) has no meaning in asyncserve" in log
    assert "vllm-sekret" not in log


def test_tensor_parallel_divisibility_fails_from_config_json_before_torch_is_imported(tiny_model_dir):
    path = tiny_model_dir("llama")  # 4 attention heads
    code = ("import sys\nfrom asyncserve.cli import main\ntry:\n"
            f"    main(['serve', {path!r}, '--tensor-parallel-size', '3', '--port', '0'])\n"
            "except SystemExit as exit:\n    print('exit', exit.code)\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.stderr == ("asyncserve: error: The model cannot be split over tensor_parallel_size=3: "
                             "num_attention_heads (4) is not divisible by tensor_parallel_size (3).\n")
    assert result.stdout.splitlines() == ["exit 2", "[]"]
