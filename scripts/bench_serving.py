"""Load generator for an OpenAI-compatible server: TTFT, TPOT, ITL, throughput, and the server's loop lag.

    python scripts/bench_serving.py --serve-tiny --num-prompts 512 --max-concurrency 256
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --request-rate 20 --num-prompts 200

Requests stream (SSE). Arrivals are Poisson at --request-rate (default: all at once), capped at
--max-concurrency in flight. Prompts are random token ids of --input-len (completions) or random
words (chat); outputs are --output-len tokens (EOS ignored unless --no-ignore-eos).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp
import orjson


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between content-bearing events


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_serving", description=__doc__.split("\n")[0])
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", help="Server root, e.g. http://127.0.0.1:8000 (the API is under /v1).")
    target.add_argument("--serve-tiny", action="store_true",
                        help="Start a server in this process (same event loop) on the tiny model.")
    target.add_argument("--serve-model", default=None, help="With --serve-tiny: this checkpoint instead.")
    target.add_argument("--api-key", default=None)
    target.add_argument("--model", default=None, help="Model name to send (default: the server's first).")
    target.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    load = parser.add_argument_group("load")
    load.add_argument("--num-prompts", type=int, default=200)
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Requests per second, Poisson arrivals (default: inf, all at once).")
    load.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight.")
    load.add_argument("--input-len", type=int, default=32)
    load.add_argument("--output-len", type=int, default=64)
    load.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="Lengths are drawn from [len * (1 - r), len * (1 + r)].")
    load.add_argument("--prompt", default=None, help="Send this prompt instead of random ones.")
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", default=None, help="Also write the results here.")
    return parser


def _lengths(mean: int, ratio: float, count: int, rng: random.Random) -> list[int]:
    low, high = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(low, high) for _ in range(count)]


def make_requests(args, vocab_size: int) -> list[dict]:
    rng = random.Random(args.seed)
    inputs = _lengths(args.input_len, args.random_range_ratio, args.num_prompts, rng)
    outputs = _lengths(args.output_len, args.random_range_ratio, args.num_prompts, rng)
    words = ["alpha", "river", "stone", "blue", "quick", "house", "light", "seven", "paper", "wind"]
    bodies = []
    for input_len, output_len in zip(inputs, outputs):
        body = {"model": args.model, "max_tokens": output_len, "temperature": args.temperature, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
        if args.endpoint == "completions":
            body["prompt"] = args.prompt or [rng.randrange(10, vocab_size) for _ in range(input_len)]
        else:
            text = args.prompt or " ".join(rng.choice(words) for _ in range(input_len))
            body["messages"] = [{"role": "user", "content": text}]
        bodies.append(body)
    return bodies


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    result = RequestResult()
    start = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            buffer = b""
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                buffer += chunk
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    data = raw.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        continue
                    event = orjson.loads(data)
                    if event.get("usage"):
                        result.prompt_tokens = event["usage"]["prompt_tokens"]
                        result.output_tokens = event["usage"]["completion_tokens"]
                    if not any(c.get("text") or (c.get("delta") or {}).get("content") for c in event["choices"]):
                        continue
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no usage in the stream"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _stats(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values) if values else 0.0, "p50": _percentile(values, 50),
            "p99": _percentile(values, 99)}


async def _metrics(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    async with session.get(base_url + "/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            values.setdefault(series.partition("{")[0], float(value))
    return values


async def run(args, base_url: str) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        async with session.get(base_url + "/v1/models") as response:
            models = (await response.json())["data"]
        args.model = args.model or models[0]["id"]
        vocab_size = 500  # random ids stay inside any real vocabulary
        bodies = make_requests(args, vocab_size)
        url = base_url + ("/v1/completions" if args.endpoint == "completions" else "/v1/chat/completions")
        limit = asyncio.Semaphore(args.max_concurrency or len(bodies))
        rng = random.Random(args.seed + 1)

        async def limited(body: dict) -> RequestResult:
            async with limit:
                return await _one(session, url, body)

        before = await _metrics(session, base_url)
        started = time.perf_counter()
        tasks = []
        for body in bodies:
            tasks.append(asyncio.ensure_future(limited(body)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        after = await _metrics(session, base_url)
    return summarize(args, results, duration, before, after)


def summarize(args, results: list[RequestResult], duration: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    lag_count = after.get("asyncserve:event_loop_lag_seconds_count", 0) - \
        before.get("asyncserve:event_loop_lag_seconds_count", 0)
    lag_sum = after.get("asyncserve:event_loop_lag_seconds_sum", 0) - \
        before.get("asyncserve:event_loop_lag_seconds_sum", 0)
    return {
        "num_prompts": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "max_concurrency": args.max_concurrency, "request_rate": args.request_rate,
        "duration_s": duration,
        "request_throughput": len(ok) / duration, "output_token_throughput": output_tokens / duration,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration,
        "total_output_tokens": output_tokens, "total_prompt_tokens": prompt_tokens,
        "ttft_s": _stats([r.ttft for r in ok]), "tpot_s": _stats(tpot),
        "itl_s": _stats([gap for r in ok for gap in r.itl]), "e2e_s": _stats([r.latency for r in ok]),
        "server_loop_lag_max_s": after.get("asyncserve:event_loop_lag_seconds_max"),
        "server_loop_lag_mean_s": lag_sum / lag_count if lag_count else None,
    }


def report(results: dict) -> str:
    def ms(stats: dict) -> str:
        return f"mean {stats['mean'] * 1e3:8.2f} | p50 {stats['p50'] * 1e3:8.2f} | p99 {stats['p99'] * 1e3:8.2f}"

    lag_max, lag_mean = results["server_loop_lag_max_s"], results["server_loop_lag_mean_s"]
    lines = [
        "=" * 22 + " Serving benchmark " + "=" * 22,
        f"requests: {results['completed']} ok, {results['failed']} failed, in {results['duration_s']:.2f} s "
        f"(max concurrency {results['max_concurrency']}, rate {results['request_rate']})",
        f"request throughput:      {results['request_throughput']:10.2f} req/s",
        f"output token throughput: {results['output_token_throughput']:10.1f} tok/s",
        f"total token throughput:  {results['total_token_throughput']:10.1f} tok/s",
        f"TTFT (ms): {ms(results['ttft_s'])}",
        f"TPOT (ms): {ms(results['tpot_s'])}",
        f"ITL  (ms): {ms(results['itl_s'])}",
        f"E2E  (ms): {ms(results['e2e_s'])}",
        "server loop lag: " + (f"max {lag_max * 1e3:.1f} ms" if lag_max is not None else "n/a")
        + (f", mean {lag_mean * 1e3:.2f} ms" if lag_mean is not None else ""),
    ]
    if results["errors"]:
        lines.append(f"errors: {results['errors']}")
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def tiny_server(model: str | None):
    """A server on 127.0.0.1 in this process and loop, on the tiny model (or `model`)."""
    from aiohttp import web

    from asyncserve import AsyncEngine, EngineConfig
    from asyncserve.server import SERVER_STATE, openai_app
    from asyncserve.default_model import TINY_MODEL
    engine = AsyncEngine(EngineConfig(model=model or TINY_MODEL, max_num_seqs=256))
    app = openai_app(engine, log_requests=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        app[SERVER_STATE].lag.reset()  # measure the run, not the start-up
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def async_main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if bool(args.base_url) == bool(args.serve_tiny):
        raise SystemExit("bench_serving: give exactly one of --base-url or --serve-tiny")
    if args.serve_tiny:
        async with tiny_server(args.serve_model) as base_url:
            results = await run(args, base_url)
    else:
        results = await run(args, args.base_url.rstrip("/"))
    print(report(results))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    results = runner(async_main(argv))
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
