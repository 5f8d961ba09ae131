"""Load generator for an OpenAI-compatible server, read side by side with `vllm bench serve`.

    python scripts/bench_serving.py --backend vllm --model DIR --dataset-name random \
        --random-input-len 512 --random-output-len 128 --ignore-eos --num-prompts 256 --max-concurrency 64
    python scripts/bench_serving.py --serve-tiny --num-prompts 64 --random-input-len 32 --random-output-len 16

It takes `vllm bench serve`'s random-dataset workload flags under the same names and prints the same
statistics with the same names, layout and definitions (TTFT; TPOT = (latency - TTFT) / (output tokens - 1)
per request with more than one output token, averaged; ITL = gaps between streamed chunks; latency ends at
the last chunk with choices), plus the server's event-loop lag when it exports it (asyncserve's /metrics).

One difference, on purpose: vLLM's random dataset sends text decoded from random token ids and the server
re-tokenizes it; we send the random ids themselves as a `prompt` list of ints, which is exact. With a
word-level tokenizer of one token per id (scripts/bench_models.py) both give the server the same tokens.
The chat backend has to send text: the ids decoded by --tokenizer (random words without one).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime

import aiohttp
import numpy as np
import orjson

FALLBACK_VOCAB = 500  # without a tokenizer, ids below this stay inside any real vocabulary
LAG_METRIC = "asyncserve:event_loop_lag_seconds"
METRIC_HEADERS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                  "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    start_time: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between chunks that carry choices


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_serving", description=__doc__.split("\n")[0])
    target = parser.add_argument_group("target")
    target.add_argument("--backend", choices=("vllm", "openai", "openai-chat"), default="vllm",
                        help="vllm and openai: /v1/completions with token-id prompts; openai-chat: "
                             "/v1/chat/completions.")
    target.add_argument("--endpoint", choices=("completions", "chat"), default=None,
                        help="Old name: chat is --backend openai-chat.")
    target.add_argument("--base-url", default=None, help="Server root, e.g. http://127.0.0.1:8000 (API under /v1).")
    target.add_argument("--host", default="127.0.0.1")
    target.add_argument("--port", type=int, default=8000)
    target.add_argument("--serve-tiny", action="store_true",
                        help="Start a server in this process (same event loop) on the tiny model.")
    target.add_argument("--serve-model", default=None, help="With --serve-tiny: this checkpoint instead.")
    target.add_argument("--api-key", default=None)
    target.add_argument("--model", default=None, help="Model to send (default: the server's first).")
    target.add_argument("--served-model-name", default=None, help="Name to send instead of --model.")
    target.add_argument("--tokenizer", default=None,
                        help="Tokenizer to draw ids from (default: --model when it is a local directory).")
    load = parser.add_argument_group("workload (vllm bench serve's random dataset)")
    load.add_argument("--dataset-name", choices=("random",), default="random")
    load.add_argument("--num-prompts", type=int, default=1000)
    load.add_argument("--random-input-len", "--input-len", dest="random_input_len", type=int, default=1024)
    load.add_argument("--random-output-len", "--output-len", dest="random_output_len", type=int, default=128)
    load.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)].")
    load.add_argument("--request-rate", type=float, default=math.inf,
                      help="Requests per second (default: inf, all at once).")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="Gamma shape of the arrival gaps; 1 is a Poisson process.")
    load.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight.")
    load.add_argument("--ignore-eos", action="store_true", help="Generate exactly the output length.")
    load.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help=argparse.SUPPRESS)
    load.add_argument("--temperature", type=float, default=0.0)
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--prompt", default=None, help="Send this prompt instead of random ones.")
    load.add_argument("--num-warmups", type=int, default=0, help="Uncounted requests before the run.")
    load.add_argument("--disable-tqdm", action="store_true", help="Accepted for vLLM's habits; no bar here.")
    out = parser.add_argument_group("results")
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                     help="Comma-separated from ttft, tpot, itl, e2el.")
    out.add_argument("--metric-percentiles", default="99", help="Comma-separated percentiles, e.g. 50,90,99.")
    out.add_argument("--save-result", action="store_true", help="Write the results as JSON.")
    out.add_argument("--result-dir", default=None)
    out.add_argument("--result-filename", default=None)
    out.add_argument("--result-json", default=None, help="Old name: --save-result --result-filename FILE.")
    return parser


def _lengths(mean: int, ratio: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """vLLM's random dataset: uniform integers in [floor(len * (1 - r)), ceil(len * (1 + r))]."""
    low, high = max(1, math.floor(mean * (1 - ratio))), max(1, math.ceil(mean * (1 + ratio)))
    return rng.integers(low, high + 1, size=count)


def load_tokenizer(args):
    """The tokenizer random ids come from (and chat text is decoded with), or None."""
    path = args.tokenizer or (args.model if args.model and os.path.isdir(args.model) else None)
    if not path:
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def allowed_ids(tokenizer) -> np.ndarray:
    """Every id that is not a special token (an EOS in a prompt would be odd; vLLM drops them too)."""
    if tokenizer is None:
        return np.arange(10, FALLBACK_VOCAB)
    special = set(tokenizer.all_special_ids)
    return np.array([i for i in range(len(tokenizer)) if i not in special])


def make_requests(args, tokenizer=None) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    inputs = _lengths(args.random_input_len, args.random_range_ratio, args.num_prompts, rng)
    outputs = _lengths(args.random_output_len, args.random_range_ratio, args.num_prompts, rng)
    ids = allowed_ids(tokenizer)
    words = ["alpha", "river", "stone", "blue", "quick", "house", "light", "seven", "paper", "wind"]
    bodies = []
    for input_len, output_len in zip(inputs.tolist(), outputs.tolist()):
        body = {"model": args.model, "max_tokens": output_len, "temperature": args.temperature, "stream": True,
                "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
        prompt_ids = rng.choice(ids, size=input_len).tolist()
        if args.backend != "openai-chat":
            body["prompt"] = args.prompt or prompt_ids
        else:
            text = args.prompt or (tokenizer.decode(prompt_ids) if tokenizer is not None
                                   else " ".join(words[i % len(words)] for i in prompt_ids))
            body["messages"] = [{"role": "user", "content": text}]
        bodies.append(body)
    return bodies


async def _one(session: aiohttp.ClientSession, url: str, body: dict) -> RequestResult:
    """One streamed request, timed as vLLM's client times it: every chunk with choices is a token event."""
    result = RequestResult(prompt_len=len(body["prompt"]) if isinstance(body.get("prompt"), list) else 0)
    start = result.start_time = time.perf_counter()
    last = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            buffer = b""
            async for chunk in response.content.iter_any():
                buffer += chunk
                while b"\n\n" in buffer:
                    raw, buffer = buffer.split(b"\n\n", 1)
                    data = raw.strip().removeprefix(b"data:").strip()
                    if not data or data == b"[DONE]":
                        continue
                    event = orjson.loads(data)
                    if event.get("usage"):
                        result.prompt_len = event["usage"]["prompt_tokens"]
                        result.output_tokens = event["usage"]["completion_tokens"]
                    if not event.get("choices"):
                        continue
                    now = time.perf_counter()
                    if last is None:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = (last or time.perf_counter()) - start
        result.ok = result.output_tokens > 0
        if not result.ok:
            result.error = "no usage in the stream"
    except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def _metrics(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    """The server's Prometheus figures by series name; {} where it has none."""
    try:
        async with session.get(base_url + "/metrics") as response:
            if response.status != 200:
                return {}
            text = await response.text()
    except aiohttp.ClientError:
        return {}
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            if name == LAG_METRIC + "_bucket":  # keyed by the bucket's upper edge: le="0.01"
                name += "@" + labels.partition('le="')[2].partition('"')[0]
            with contextlib.suppress(ValueError):
                values.setdefault(name, float(value))
    return values


def lag_window_bound_ms(before: dict, after: dict) -> float | None:
    """The upper edge of the histogram bucket that holds the worst loop lag during the run (the server's max
    gauge counts from its start-up, warm-up included); None without the histogram."""
    prefix = LAG_METRIC + "_bucket@"
    edges = sorted((float(key[len(prefix):]), key) for key in after if key.startswith(prefix))
    if not edges:
        return None
    total = after[edges[-1][1]] - before.get(edges[-1][1], 0)
    for edge, key in edges:
        if after[key] - before.get(key, 0) >= total:
            return edge * 1e3
    return None


def _arrival_gaps(args, count: int):
    rng = np.random.default_rng(args.seed + 1)
    for _ in range(count):
        if math.isinf(args.request_rate):
            yield 0.0
        else:  # vLLM: gamma with shape = burstiness and mean 1 / rate
            yield float(rng.gamma(args.burstiness, 1.0 / (args.request_rate * args.burstiness)))


async def run(args, base_url: str, tokenizer=None) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session:
        async with session.get(base_url + "/v1/models") as response:
            models = (await response.json())["data"]
        args.model = args.served_model_name or args.model or models[0]["id"]
        bodies = make_requests(args, tokenizer)
        url = base_url + ("/v1/chat/completions" if args.backend == "openai-chat" else "/v1/completions")
        print("Starting initial single prompt test run...")
        test = await _one(session, url, bodies[0])
        if not test.ok:
            raise RuntimeError(f"bench_serving: the initial test run failed: {test.error}")
        for _ in range(args.num_warmups):
            await _one(session, url, bodies[0])
        print(f"Traffic request rate: {args.request_rate}")
        print(f"Burstiness factor: {args.burstiness} "
              f"({'Poisson process' if args.burstiness == 1.0 else 'Gamma distribution'})")
        print(f"Maximum request concurrency: {args.max_concurrency}")
        limit = asyncio.Semaphore(args.max_concurrency or len(bodies))

        async def limited(body: dict) -> RequestResult:
            async with limit:
                return await _one(session, url, body)

        before = await _metrics(session, base_url)
        started = time.perf_counter()
        tasks = []
        for body, gap in zip(bodies, _arrival_gaps(args, len(bodies))):
            tasks.append(asyncio.ensure_future(limited(body)))
            if gap:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
        after = await _metrics(session, base_url)
    return summarize(args, results, duration, before, after)


def _peaks(ok: list[RequestResult]) -> tuple[float, int]:
    """vLLM's peak output tokens in any one-second bucket, and peak requests in flight."""
    if not ok:
        return 0.0, 0
    origin = min(r.start_time for r in ok)
    buckets = np.zeros(int(math.ceil(max(r.start_time + r.latency for r in ok) - origin)) + 1)
    events = []
    for r in ok:
        times = r.start_time + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])
        np.add.at(buckets, (times - origin).astype(int).clip(0, len(buckets) - 1), 1)
        events += [(r.start_time, 1), (r.start_time + r.latency, -1)]
    current = peak = 0
    for _, delta in sorted(events):
        current += delta
        peak = max(peak, current)
    return float(buckets.max()), peak


def summarize(args, results: list[RequestResult], duration: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r.ok]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    samples = {"ttft": [r.ttft for r in ok], "e2el": [r.latency for r in ok],
               "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
               "itl": [gap for r in ok for gap in r.itl]}
    peak_tokens, peak_requests = _peaks(ok)
    out = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "model_id": args.model,
        "tokenizer_id": args.tokenizer, "num_prompts": len(results), "request_rate": args.request_rate,
        "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, "ignore_eos": args.ignore_eos,
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": total_input, "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration, "output_throughput": total_output / duration,
        "total_token_throughput": (total_input + total_output) / duration,
        "max_output_tokens_per_s": peak_tokens, "max_concurrent_requests": peak_requests,
    }
    percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    for name, values in samples.items():
        ms = np.asarray(values or [0.0]) * 1e3
        out[f"mean_{name}_ms"], out[f"median_{name}_ms"] = float(ms.mean()), float(np.median(ms))
        out[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    lag_count = after.get(LAG_METRIC + "_count", 0) - before.get(LAG_METRIC + "_count", 0)
    lag_sum = after.get(LAG_METRIC + "_sum", 0) - before.get(LAG_METRIC + "_sum", 0)
    lag_max = after.get(LAG_METRIC + "_max")
    out["server_loop_lag_max_ms"] = lag_max * 1e3 if lag_max is not None else None
    out["server_loop_lag_run_bound_ms"] = lag_window_bound_ms(before, after)
    out["server_loop_lag_mean_ms"] = lag_sum / lag_count * 1e3 if lag_count else None
    out.update({"input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
                "ttfts": [r.ttft for r in results], "itls": [r.itl for r in results],
                "latencies": [r.latency for r in results], "errors": [r.error for r in results]})
    return out


def report(results: dict, args) -> str:
    """vLLM's block, line for line, then the server's loop lag."""
    def row(label, value, fmt=""):
        return f"{label:<40} {value:<10{fmt}}"

    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="),
             row("Successful requests:", results["completed"]), row("Failed requests:", results["failed"])]
    if args.max_concurrency is not None:
        lines.append(row("Maximum request concurrency:", args.max_concurrency))
    if not math.isinf(args.request_rate):
        lines.append(row("Request rate configured (RPS):", args.request_rate, ".2f"))
    lines += [row("Benchmark duration (s):", results["duration"], ".2f"),
              row("Total input tokens:", results["total_input_tokens"]),
              row("Total generated tokens:", results["total_output_tokens"]),
              row("Request throughput (req/s):", results["request_throughput"], ".2f"),
              row("Output token throughput (tok/s):", results["output_throughput"], ".2f"),
              row("Peak output token throughput (tok/s):", results["max_output_tokens_per_s"], ".2f"),
              row("Peak concurrent requests:", results["max_concurrent_requests"], ".2f"),
              row("Total Token throughput (tok/s):", results["total_token_throughput"], ".2f")]
    for name in args.percentile_metrics.split(","):
        lines.append("{s:{c}^{n}}".format(s=METRIC_HEADERS[name], n=50, c="-"))
        upper = name.upper()
        lines.append(row(f"Mean {upper} (ms):", results[f"mean_{name}_ms"], ".2f"))
        lines.append(row(f"Median {upper} (ms):", results[f"median_{name}_ms"], ".2f"))
        for p in args.metric_percentiles.split(","):
            lines.append(row(f"P{float(p):g} {upper} (ms):", results[f"p{float(p):g}_{name}_ms"], ".2f"))
    if results["server_loop_lag_max_ms"] is not None:
        lines.append("{s:{c}^{n}}".format(s="Server Event Loop Lag", n=50, c="-"))
        lines.append(row("Max loop lag since start-up (ms):", results["server_loop_lag_max_ms"], ".2f"))
        if results["server_loop_lag_run_bound_ms"] is not None:
            lines.append(row("Max loop lag in this run <= (ms):", results["server_loop_lag_run_bound_ms"], ".2f"))
        if results["server_loop_lag_mean_ms"] is not None:
            lines.append(row("Mean loop lag (ms):", results["server_loop_lag_mean_ms"], ".2f"))
    lines.append("=" * 50)
    errors = sorted({e for e in results["errors"] if e})[:5]
    if errors:
        lines.append(f"errors: {errors}")
    return "\n".join(lines)


@contextlib.asynccontextmanager
async def tiny_server(model: str | None):
    """A server on 127.0.0.1 in this process and loop, on the tiny model (or `model`)."""
    from aiohttp import web

    from asyncserve import AsyncEngine, EngineConfig
    from asyncserve.server import SERVER_STATE, openai_app
    from asyncserve.checkpoints.default_model import TINY_MODEL
    engine = AsyncEngine(EngineConfig(model=model or TINY_MODEL, max_num_seqs=256))
    app = openai_app(engine, log_requests=False)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        app[SERVER_STATE].lag.reset()  # measure the run, not the start-up
        yield f"http://{host}:{port}", engine.tokenizer
    finally:
        await runner.cleanup()


def _result_path(args) -> str | None:
    if args.result_json:
        return args.result_json
    if not args.save_result:
        return None
    name = args.result_filename or (
        f"{args.backend}-{args.request_rate}qps-concurrency{args.max_concurrency}-"
        f"{os.path.basename(str(args.model).rstrip('/'))}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    return os.path.join(args.result_dir, name) if args.result_dir else name


async def async_main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.endpoint:
        args.backend = "openai-chat" if args.endpoint == "chat" else "vllm"
    if not 0 <= args.random_range_ratio < 1:
        raise SystemExit("bench_serving: --random-range-ratio must be in [0, 1)")
    if args.serve_tiny:
        async with tiny_server(args.serve_model) as (base_url, tokenizer):
            results = await run(args, base_url, load_tokenizer(args) if args.tokenizer else tokenizer)
    else:
        base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
        results = await run(args, base_url, load_tokenizer(args))
    print(report(results, args))
    path = _result_path(args)
    if path:
        with open(path, "w") as f:
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
