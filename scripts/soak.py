"""Soak test: many streamed requests with random disconnects and malformed requests mixed in.

    python scripts/soak.py --serve-tiny --num-requests 20000 --concurrency 64
    python scripts/soak.py --base-url http://127.0.0.1:8000 --pid 1234 --num-requests 5000

`--serve-tiny` starts `asyncserve --model asyncserve/tiny-random` (the tiny random-weight model, not the
default SmolLM2) as a child process on a free port.
Reports: completed streams, errors (5xx, unexpected statuses, exceptions), lost streams (200 but no
`[DONE]`, not counting deliberate disconnects), streams whose usage disagrees with the tokens received,
the server's RSS growth per 1,000 requests after warm-up (needs the server's pid), and its worst loop lag.
Not part of CI: run it on demand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson


@dataclass
class Tally:
    completed: int = 0
    disconnected: int = 0
    malformed_refused: int = 0
    errors: Counter = field(default_factory=Counter)
    lost: int = 0
    usage_mismatch: int = 0
    tokens_received: int = 0
    tokens_in_usage: int = 0
    rss_samples: list = field(default_factory=list)  # (requests done, RSS bytes)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="Server root, e.g. http://127.0.0.1:8000.")
    parser.add_argument("--pid", type=int, help="With --base-url: the server's pid, for RSS.")
    parser.add_argument("--serve-tiny", action="store_true", help="Start asyncserve on asyncserve/tiny-random.")
    parser.add_argument("--num-requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--disconnect-fraction", type=float, default=0.1)
    parser.add_argument("--malformed-fraction", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=32, help="Each stream asks for 1..this tokens.")
    parser.add_argument("--warmup", type=int, default=2000, help="Requests before RSS growth is measured.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--result-json", help="Also write the report here.")
    return parser


def _rss(pid: int | None) -> int | None:
    if pid is None:
        return None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return None


async def _metrics(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    """/metrics as {name: value}, histogram buckets as {name[le]: value}; labels other than `le` dropped."""
    async with session.get(base_url + "/metrics") as response:
        text = await response.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name, _, labels = series.removeprefix("asyncserve:").partition("{")
            le = labels.partition('le="')[2].partition('"')[0]
            values[f"{name}[{le}]" if le else name] = float(value)
    return values


def _lag_samples_over(metrics: dict[str, float], bucket: str) -> float:
    """How many lag samples (one per 10 ms) exceeded the histogram bucket `bucket` (seconds)."""
    within = metrics.get(f"event_loop_lag_seconds_bucket[{bucket}]", 0.0)
    return metrics.get("event_loop_lag_seconds_count", 0.0) - within


def _stream_body(rng: random.Random, model: str, max_tokens: int, i: int) -> tuple[str, dict]:
    common = {"model": model, "max_tokens": rng.randint(1, max_tokens), "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}, "temperature": 0.8, "seed": i}
    if rng.random() < 0.5:
        return "/v1/completions", {**common, "prompt": f"Soak request {i} says", "logprobs": 0}
    return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Soak {i}"}],
                                    "logprobs": True}


def _received_tokens(event: dict) -> int:
    count = 0
    for choice in event.get("choices", []):
        logprobs = choice.get("logprobs")
        if logprobs:
            count += len(logprobs["tokens"]) if "tokens" in logprobs else len(logprobs["content"])
    return count


async def _stream(session, base_url: str, rng: random.Random, model: str, args, i: int, tally: Tally) -> None:
    path, body = _stream_body(rng, model, args.max_tokens, i)
    leave_after = rng.randint(0, 3) if rng.random() < args.disconnect_fraction else None
    async with session.post(base_url + path, json=body) as response:
        if response.status != 200:
            tally.errors[f"status {response.status}"] += 1
            return
        received, events, usage, done, buffer = 0, 0, None, False, b""
        async for chunk in response.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                raw, buffer = buffer.split(b"\n\n", 1)
                data = raw.removeprefix(b"data: ")
                if data == b"[DONE]":
                    done = True
                    continue
                event = orjson.loads(data)
                if "error" in event:
                    tally.errors["in-band error"] += 1
                received += _received_tokens(event)
                usage = event.get("usage") or usage
                events += 1
            if leave_after is not None and events >= leave_after:
                response.close()  # drops the connection mid-stream
                tally.disconnected += 1
                return
    if not done:
        tally.lost += 1
        return
    tally.completed += 1
    tally.tokens_received += received
    tally.tokens_in_usage += usage["completion_tokens"] if usage else 0
    if usage is None or usage["completion_tokens"] != received:
        tally.usage_mismatch += 1


def _malformed(rng: random.Random, model: str) -> tuple[str, bytes, dict] | bytes:
    """(path, body, headers) of a request the server must refuse with a 4xx; raw bytes for broken HTTP."""
    json_headers = {"Content-Type": "application/json"}
    choice = rng.randrange(7)
    if choice == 0:
        return "/v1/completions", b'{"prompt": "x",', json_headers
    if choice == 1:
        return "/v1/completions", orjson.dumps({"model": model, "prompt": "x", "temperature": "hot"}), json_headers
    if choice == 2:
        return "/v1/completions", b"not gzip at all", {**json_headers, "Content-Encoding": "gzip"}
    if choice == 3:
        messages = [{"role": "user", "content": 5}]
        return "/v1/chat/completions", orjson.dumps({"model": model, "messages": messages}), json_headers
    if choice == 4:
        return "/v1/completions", orjson.dumps({"model": model, "prompt": [5] * 5000}), json_headers
    if choice == 5:
        return "/v1/completions", b"prompt=x", {"Content-Type": "application/x-www-form-urlencoded"}
    return b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\nContent-Length: ten\r\n\r\n"


async def _send_malformed(session, base_url: str, rng: random.Random, model: str, tally: Tally) -> None:
    request = _malformed(rng, model)
    if isinstance(request, bytes):
        host, port = base_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()
        writer.close()
        status = int(status_line.split()[1]) if status_line else 0
    else:
        path, body, headers = request
        async with session.post(base_url + path, data=body, headers=headers) as response:
            await response.read()
            status = response.status
    if 400 <= status < 500:
        tally.malformed_refused += 1
    else:
        tally.errors[f"malformed got {status}"] += 1


async def run(args, base_url: str, pid: int | None) -> dict:
    rng = random.Random(args.seed)
    tally = Tally()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.get(base_url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        before = await _metrics(session, base_url)
        warm_metrics: dict[str, float] = {}
        next_index, done_count = 0, 0
        start = time.monotonic()

        async def worker() -> None:
            nonlocal next_index, done_count
            while next_index < args.num_requests:
                i = next_index
                next_index += 1
                try:
                    if rng.random() < args.malformed_fraction:
                        await _send_malformed(session, base_url, rng, model, tally)
                    else:
                        await _stream(session, base_url, rng, model, args, i, tally)
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the soak
                    tally.errors[type(exc).__name__] += 1
                done_count += 1
                if done_count == args.warmup:
                    warm_metrics.update(await _metrics(session, base_url))
                if done_count % 1000 == 0:
                    tally.rss_samples.append((done_count, _rss(pid)))
                    print(f"{done_count} requests, {time.monotonic() - start:.0f} s, "
                          f"RSS {(_rss(pid) or 0) / 2 ** 20:.0f} MiB", file=sys.stderr, flush=True)

        tally.rss_samples.append((0, _rss(pid)))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.monotonic() - start
        await asyncio.sleep(1.0)  # aborted requests are freed within milliseconds; leave a margin
        after = await _metrics(session, base_url)
    warm = [(n, rss) for n, rss in tally.rss_samples if n >= args.warmup and rss is not None]
    growth = ((warm[-1][1] - warm[0][1]) / 2 ** 20 / ((warm[-1][0] - warm[0][0]) / 1000)
              if len(warm) >= 2 else None)
    return {
        "requests": args.num_requests, "concurrency": args.concurrency, "elapsed_s": round(elapsed, 1),
        "completed": tally.completed, "disconnected_on_purpose": tally.disconnected,
        "malformed_refused_4xx": tally.malformed_refused, "errors": dict(tally.errors), "lost": tally.lost,
        "usage_mismatch": tally.usage_mismatch, "tokens_received": tally.tokens_received,
        "tokens_in_usage": tally.tokens_in_usage,
        "rss_mib_start": round((tally.rss_samples[0][1] or 0) / 2 ** 20, 1),
        "rss_mib_end": round((tally.rss_samples[-1][1] or 0) / 2 ** 20, 1),
        "rss_growth_mib_per_1000_after_warmup": None if growth is None else round(growth, 2),
        "worst_loop_lag_s": after.get("event_loop_lag_seconds_max"),
        "loop_lag_samples": after.get("event_loop_lag_seconds_count", 0)
        - before.get("event_loop_lag_seconds_count", 0),
        "loop_lag_samples_over_50ms": _lag_samples_over(after, "0.05") - _lag_samples_over(before, "0.05"),
        "after_warmup": {
            "loop_lag_samples": after.get("event_loop_lag_seconds_count", 0)
            - warm_metrics.get("event_loop_lag_seconds_count", 0),
            **{f"loop_lag_samples_over_{int(float(bucket) * 1000)}ms":
               _lag_samples_over(after, bucket) - _lag_samples_over(warm_metrics, bucket)
               for bucket in ("0.025", "0.05", "0.1", "0.25")}},
        "server_idle_after": after.get("num_requests_running") == 0 and after.get("num_requests_waiting") == 0
        and after.get("kv_cache_usage_perc") == 0.0,
        "internal_errors_500": after.get("http_internal_errors_total"),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit("soak: the server exited during start-up")
            try:
                async with session.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("soak: the server did not become healthy")


async def async_main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if bool(args.base_url) == bool(args.serve_tiny):
        raise SystemExit("soak: give exactly one of --base-url or --serve-tiny")
    process = None
    if args.serve_tiny:
        port = _free_port()
        process = subprocess.Popen([sys.executable, "-m", "asyncserve.cli", "--model", "asyncserve/tiny-random",
                                    "--host", "127.0.0.1", "--port", str(port), "--disable-log-requests",
                                    "--disable-log-stats"],
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        base_url, pid = f"http://127.0.0.1:{port}", process.pid
        await _wait_healthy(base_url, process)
    else:
        base_url, pid = args.base_url.rstrip("/"), args.pid
    try:
        results = await run(args, base_url, pid)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    print(json.dumps(results, indent=2))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv: list[str] | None = None) -> int:
    results = asyncio.run(async_main(argv))
    ok = not results["errors"] and results["lost"] == 0 and results["usage_mismatch"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
