"""The event loop's worst lag while one hostile structured-output request is answered, one request at a
time, on a live server in this process (its own lag monitor: how late a 10 ms sleep wakes), with how the
request ended and how long a `guided_choice` sent meanwhile took.

    python scripts/bench_hostile_grammars.py [--model DIR] [--compile-timeout 10] [--max-bytes 524288]

The constraint-size limit is raised from its default (64 KiB) so that enums big enough to compile for
longer than the deadline get through to the compiler; the 40,000-string one stays over it.

The default model is SmolLM2-135M-Instruct when it is cached (a 49k vocabulary: compiles cost what they
cost on a real model), else the tiny test model.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import aiohttp
from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def _enum(count: int) -> dict:
    return {"type": "object", "properties": {"x": {"enum": [f"value number {i}" for i in range(count)]}},
            "required": ["x"]}


CASES = {  # name -> (endpoint, body beyond model and max_tokens); the slow compiles last
    "40,000-string enum (over the size limit)": ("completions", {"guided_json": _enum(40_000)}),
    "3,000-string enum (compiled)": ("completions", {"guided_json": _enum(3_000)}),
    "JSON nested 600 deep in guided_json": ("completions", {"guided_json": _nested(600)}),
    "JSON nested 600 deep in chat_template_kwargs": ("chat", {"chat_template_kwargs": {"k": _nested(600)}}),
    "grammar root ::= root": ("completions", {"guided_grammar": "root ::= root"}),
    "guided_choice with allowed_token_ids": ("completions", {"guided_choice": ["yes", "no"],
                                                             "allowed_token_ids": [5]}),
    "beam search n=64": ("completions", {"use_beam_search": True, "n": 64}),
    "20,000-string enum (compiles past the deadline)": ("completions", {"guided_json": _enum(20_000)}),
    "client leaves while a 19,000-string enum compiles": ("leave", {"guided_json": _enum(19_000)}),
}
PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "leave": "/v1/completions"}


async def _send(http, url: str, kind: str, body: dict) -> tuple[int | str, float]:
    payload = {"model": "m", "max_tokens": 2, **body}
    if kind == "chat":
        payload["messages"] = [{"role": "user", "content": "hi"}]
    else:
        payload["prompt"] = "x"
    started = time.perf_counter()
    try:
        async with http.post(url + PATHS[kind], json=payload,
                             timeout=aiohttp.ClientTimeout(total=0.5 if kind == "leave" else 600)) as response:
            await response.read()
            return response.status, time.perf_counter() - started
    except asyncio.TimeoutError:
        return "left after 0.5 s", time.perf_counter() - started


async def main() -> None:
    from bench_grammar import default_tokenizer_dir

    from asyncserve import AsyncEngine, EngineConfig
    from asyncserve.server import SERVER_STATE, openai_app
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--compile-timeout", type=float, default=10.0)
    parser.add_argument("--max-bytes", type=int, default=512 * 1024)
    args = parser.parse_args()
    model = args.model or default_tokenizer_dir()
    engine = AsyncEngine(EngineConfig(model=model, device="cpu", max_model_len=512, num_gpu_blocks_override=64,
                                      served_model_name="m",
                                      structured_outputs_compile_timeout=args.compile_timeout,
                                      structured_outputs_max_bytes=args.max_bytes))
    app = openai_app(engine, log_requests=False)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://127.0.0.1:%d" % runner.addresses[0][1]
    lag = app[SERVER_STATE].lag
    print(f"model {model}, compile timeout {args.compile_timeout:g} s, max bytes {args.max_bytes}, "
          f"{os.cpu_count()} CPUs")
    print(f"{'hostile request':<54} {'answer':>16} {'took':>8} {'worst lag':>10} {'choice meanwhile':>17}")
    try:
        async with aiohttp.ClientSession() as http:
            await _send(http, url, "completions", {"guided_choice": ["yes", "no"]})  # warm: backend, model
            for name, (kind, body) in CASES.items():
                lag.reset()
                hostile = asyncio.ensure_future(_send(http, url, kind, body))
                await asyncio.sleep(0.2)
                _, choice_seconds = await _send(http, url, "completions", {"guided_choice": ["yes", "no"]})
                status, seconds = await hostile
                await asyncio.sleep(0.05)
                print(f"{name:<54} {status!s:>16} {seconds:>7.2f}s {lag.reset() * 1000:>8.0f}ms "
                      f"{choice_seconds:>16.2f}s")
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
