"""`asyncserve serve MODEL` / `asyncserve --model MODEL`: the OpenAI-compatible server, with vLLM's flags;
`asyncserve run-batch -i IN -o OUT`: a batch file answered through the same app, as `vllm run-batch`.

Only the standard library and asyncserve.config load before the arguments are parsed: `--help` answers at
once, and torch, transformers and aiohttp are imported only once there is a model to serve.
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import errno
import logging
import os
import socket
import sys

from asyncserve.config import EngineConfig
from asyncserve.config.serve_flags import build_parser, engine_config, parse_args
from asyncserve.config.vllm_compat import flag_lines
from asyncserve.errors import ConfigError, UnsupportedModelError

__all__ = ["build_batch_parser", "build_parser", "engine_config", "main", "parse_args", "resolve_api_key", "run"]

logger = logging.getLogger("asyncserve")

# Where the API key may come from besides --api-key, in order: ours, then vLLM's.
API_KEY_VARIABLES = ("ASYNCSERVE_API_KEY", "VLLM_API_KEY")


def resolve_api_key(flag_value: str | None, environ=os.environ) -> tuple[str | None, str]:
    """(the key in force, the start-up line saying where it came from): --api-key, then
    $ASYNCSERVE_API_KEY, then vLLM's $VLLM_API_KEY; as in vLLM, an empty value is no key."""
    given = [(source, key) for source, key in [("--api-key", flag_value)]
             + [(f"${name}", environ.get(name)) for name in API_KEY_VARIABLES] if key]
    if not given:
        return None, ("no API key (--api-key, $ASYNCSERVE_API_KEY, $VLLM_API_KEY): anyone who can reach this "
                      "port can use the API")
    source, key = given[0]
    others = [other_source for other_source, other in given[1:] if other != key]
    unused = f" ({' and '.join(others)} also set, not used)" if others else ""
    return key, f"API key from {source}: the API routes need 'Authorization: Bearer <key>'{unused}"


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds the port before the model loads, so a port in use fails at once rather than minutes later."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _listen_or_exit(parser: argparse.ArgumentParser, host: str, port: int) -> socket.socket:
    try:
        return bind_socket(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            parser.exit(1, f"asyncserve: error: port {port} is already in use on {host}: stop what holds it, "
                           "or pick another --port.\n")
        parser.exit(1, f"asyncserve: error: cannot listen on {host}:{port}: {exc.strerror or exc}.\n")


def _check_before_loading(args: argparse.Namespace) -> EngineConfig:
    """The engine's config, the chat template and the parsers checked: a bad value fails now, not after the
    model loads."""
    config = engine_config(args)
    from asyncserve.server.chat import load_chat_template
    load_chat_template(args.chat_template)
    from asyncserve.server.parsers_config import check_parsers
    check_parsers(args.tool_call_parser, args.enable_auto_tool_choice, args.reasoning_parser)
    return config


def _log_start_up_notes(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.trust_remote_code:
        logger.info("--trust-remote-code has no effect: asyncserve runs its own code for the architectures "
                    "it supports and never a checkpoint's")
    for line in flag_lines(args.vllm_flags)[1]:
        logger.info("%s", line)


def _lora_modules(args: argparse.Namespace) -> list[dict]:
    from asyncserve.server.lora_adapters import parse_lora_modules
    lora_modules = parse_lora_modules(args.lora_modules)
    if (lora_modules or args.lora_dir) and not args.enable_lora:
        raise ConfigError("--lora-modules and --lora-dir need --enable-lora.")
    return lora_modules


def _app_options(args: argparse.Namespace, names: list[str], lora_modules: list[dict]) -> dict:
    """What `serve` and `run-batch` give openai_app alike: a batch line is answered as the server would."""
    return {"served_model_name": names, "chat_template": args.chat_template,
            "max_body_bytes": int(args.max_request_body_mb * 1024 * 1024), "tool_call_parser": args.tool_call_parser,
            "enable_auto_tool_choice": args.enable_auto_tool_choice, "reasoning_parser": args.reasoning_parser,
            "lora_modules": lora_modules, "lora_dir": args.lora_dir,
            "return_tokens_as_token_ids": args.return_tokens_as_token_ids}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-batch"]:
        return run_batch_main(argv[1:])
    parser = build_parser()
    args = parse_args(parser, argv)
    sock = None
    try:
        config = _check_before_loading(args)
        names = config.model_names  # before loading: the default is named by its hub id, not its cache path
        from asyncserve.server.cors import CorsConfig
        from asyncserve.server.listener import ConnectionLimits, raise_open_file_limit
        cors = None if args.allowed_origins is None else CorsConfig(
            allowed_origins=args.allowed_origins, allowed_methods=args.allowed_methods,
            allowed_headers=args.allowed_headers, allow_credentials=args.allow_credentials)
        limits = ConnectionLimits(keepalive_timeout=args.timeout_keep_alive, max_connections=args.max_connections)
        raise_open_file_limit()
        sock = _listen_or_exit(parser, args.host, args.port)
        _log_start_up_notes(args)
        api_key, api_key_line = resolve_api_key(args.api_key)
        logger.info("%s", api_key_line)
        lora_modules = _lora_modules(args)
        from asyncserve.engine.async_engine import AsyncEngine
        engine = AsyncEngine(config)
    except (ConfigError, UnsupportedModelError) as exc:
        if sock is not None:
            sock.close()
        parser.exit(2, f"asyncserve: error: {exc}\n")

    from asyncserve.server import openai_app
    from asyncserve.server.run import serve
    app = openai_app(engine, api_key=api_key, log_requests=not args.disable_log_requests,
                     drain_timeout=args.shutdown_timeout, cors=cors, stream_write_timeout=args.stream_write_timeout,
                     request_body_timeout=args.request_body_timeout, health_stall_timeout=args.health_stall_timeout,
                     **_app_options(args, names, lora_modules))
    port = sock.getsockname()[1]

    def announce(_addresses: list) -> None:
        logger.info("serving %s at http://%s:%d/v1 (chat page: http://%s:%d/, health: /health, metrics: "
                    "/metrics); Ctrl+C stops", ", ".join(names), args.host, port, args.host, port)

    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(
            app, args.host, port, sock=sock, on_started=announce, shutdown_timeout=args.shutdown_timeout + 5.0,
            access_log=None if args.disable_log_requests else logging.getLogger("aiohttp.access"), limits=limits))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        engine.shutdown()  # tensor-parallel workers end with the server
    logger.info("asyncserve stopped")
    return 0


def build_batch_parser() -> argparse.ArgumentParser:
    """`asyncserve run-batch`: serve's flags (engine, chat template, parsers, --config) and the two files."""
    parser = build_parser()
    parser.prog = "asyncserve run-batch"
    parser.usage = "asyncserve run-batch -i INPUT.jsonl -o OUTPUT.jsonl [MODEL] [options]"
    parser.description = (
        "Answer a batch file, as `vllm run-batch`: each line of INPUT is a request in OpenAI's batch format "
        "({\"custom_id\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\" | \"/v1/completions\" | "
        "\"/v1/embeddings\", \"body\"}); each line of OUTPUT is its answer ({\"id\", \"custom_id\", \"response\": "
        "{\"status_code\", \"request_id\", \"body\"}, \"error\"}), in input order, one per request: a line the "
        "server refuses, or that breaks the format, gets its error there. The requests run concurrently through "
        "the server's own request handling, so each body is what `asyncserve serve` answers.")
    parser.epilog = ("The HTTP server's own flags (--port, --api-key, CORS, timeouts) are accepted and do nothing "
                     "here. Example: asyncserve run-batch -i requests.jsonl -o results.jsonl --model "
                     "Qwen/Qwen2.5-0.5B-Instruct")
    files = parser.add_argument_group("batch files")
    files.add_argument("-i", "--input-file", metavar="FILE",
                       help="The requests, one JSON object a line (blank lines are skipped); - reads stdin.")
    files.add_argument("-o", "--output-file", metavar="FILE",
                       help="Where the answers go, one JSON object a line; - writes stdout.")
    return parser


def run_batch_main(argv: list[str]) -> int:
    """`asyncserve run-batch -i INPUT -o OUTPUT ...`: the engine and app of `serve`, fed from a file."""
    parser = build_batch_parser()
    args = parse_args(parser, argv)
    if args.input_file is None or args.output_file is None:
        parser.error("run-batch needs -i INPUT (a JSONL file, or - for stdin) and -o OUTPUT (or - for stdout).")
    try:
        config = _check_before_loading(args)
        names = config.model_names
        from asyncserve.server.batch_files import open_batch_files
        lines, total, output = open_batch_files(args.input_file, args.output_file)
        _log_start_up_notes(args)
        lora_modules = _lora_modules(args)
        from asyncserve.engine.async_engine import AsyncEngine
        engine = AsyncEngine(config)
    except (ConfigError, UnsupportedModelError) as exc:
        parser.exit(2, f"asyncserve: error: {exc}\n")

    from asyncserve.server import openai_app
    from asyncserve.server.batch import MIN_IN_FLIGHT
    from asyncserve.server.batch_files import close_batch_files, run_batch_file
    app = openai_app(engine, log_requests=False, **_app_options(args, names, lora_modules))
    logger.info("run-batch: %d requests from %s to %s, served by %s", total, args.input_file, args.output_file,
                ", ".join(names))
    loop = new_event_loop()
    try:
        summary = loop.run_until_complete(run_batch_file(
            app, lines, output, total=total, max_in_flight=max(MIN_IN_FLIGHT, 2 * args.max_num_seqs)))
    finally:
        close_batch_files(lines, output)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        engine.shutdown()
    logger.info("run-batch: %d requests in %.1f s: %d answered 200, %d errors", summary.lines, summary.seconds,
                summary.succeeded, summary.failed)
    return 0


def run() -> None:
    """The `asyncserve` command: `main()`, then, once the server has stopped, an exit without the interpreter's
    teardown, which frees torch's and the model's objects one by one for 1-3 s (and SIGTERM's sender waits).

    The exit runs as the last atexit callback (registered first), so that every other one still runs.
    """
    finished: list[int] = []
    atexit.register(_exit_now, finished)
    finished.append(main())


def _exit_now(finished: list[int]) -> None:
    if not finished:  # main() raised: the interpreter reports it and exits as usual
        return
    logging.shutdown()  # its own atexit callback came before ours, so it would run after this
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(finished[0])


if __name__ == "__main__":
    run()
