"""The server's worst event-loop lag during each kind of hostile client, one kind at a time.

    python scripts/hostile_lag.py                      # starts asyncserve on asyncserve/tiny-random
    python scripts/hostile_lag.py --base-url http://127.0.0.1:8000

Kinds: a flood of idle connections (beyond --max-connections, so that new ones replace old ones, then all
closed by the keep-alive timeout), half-sent request heads, each malformed HTTP request of
tests/server/test_malformed_http.py, and a request of 100,000 unknown fields. The lag comes from the
server's own monitor (how late a 10 ms sleep wakes), read from /metrics before and after each kind: the
report gives, per kind, the bucket the worst new sample fell in and how many samples exceeded 100 ms.
Not part of CI: run it on demand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys

import aiohttp
import orjson

from asyncserve.server.listener import raise_open_file_limit
from asyncserve.server.metrics import LAG_BUCKETS

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: lag\r\nContent-Type: application/json\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
MALFORMED = {
    "content-length-not-a-number": HEAD + b"Content-Length: ten\r\n\r\n",
    "content-length-negative": HEAD + b"Content-Length: -1\r\n\r\n{}",
    "content-length-twice": HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "content-length-and-chunked": HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    "chunked-not-last": HEAD + b"Transfer-Encoding: chunked, gzip\r\n\r\n",
    "unknown-transfer-encoding": HEAD + b"Transfer-Encoding: bogus\r\n\r\n",
    "chunk-size-not-hex": CHUNKED + b"zz\r\n{}\r\n0\r\n\r\n",
    "chunk-size-overflow": CHUNKED + b"ffffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
    "chunk-without-crlf": CHUNKED + b"2\r\n{}XX0\r\n\r\n",
    "bare-lf-line-endings": b"POST /v1/completions HTTP/1.1\nHost: lag\nContent-Length: 2\n\n{}",
    "9-kb-header": b"GET /v1/models HTTP/1.1\r\nHost: lag\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "200-headers": b"GET /v1/models HTTP/1.1\r\nHost: lag\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200))
                   + b"\r\n",
    "100-kb-request-line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: lag\r\n\r\n",
    "nul-in-a-header": b"GET /v1/models HTTP/1.1\r\nHost: lag\r\nX-A: a\x00b\r\n\r\n",
    "space-before-colon": b"GET /v1/models HTTP/1.1\r\nHost : lag\r\n\r\n",
    "obsolete-line-folding": b"GET /v1/models HTTP/1.1\r\nHost: lag\r\nX-A: a\r\n b\r\n\r\n",
    "bad-http-version": b"GET /v1/models HTTP/9.x\r\nHost: lag\r\n\r\n",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hostile_lag", description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="Server root, e.g. http://127.0.0.1:8000 (else one is started).")
    parser.add_argument("--idle-connections", type=int, default=2000)
    parser.add_argument("--max-connections", type=int, default=1000, help="For the server this script starts.")
    parser.add_argument("--half-heads", type=int, default=500)
    return parser


async def _lag_histogram(http: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    async with http.get(base_url + "/metrics") as response:
        text = await response.text()
    counts = {}
    for line in text.splitlines():
        if line.startswith("asyncserve:event_loop_lag_seconds_bucket"):
            le = line.partition('le="')[2].partition('"')[0]
            counts[le] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("asyncserve:event_loop_lag_seconds_count"):
            counts["count"] = float(line.rsplit(" ", 1)[1])
    return counts


def _worst(before: dict, after: dict) -> dict:
    """The smallest bucket holding every new sample, and how many new samples exceeded 100 ms."""
    new = after["count"] - before["count"]
    worst = next((f"<= {bound * 1000:g} ms" for bound in LAG_BUCKETS
                  if after[f"{bound}"] - before[f"{bound}"] == new), "> 2500 ms")
    over_100 = new - (after["0.1"] - before["0.1"])
    return {"samples": int(new), "worst": worst, "samples_over_100ms": int(over_100)}


async def _closed(reader: asyncio.StreamReader) -> None:
    await asyncio.wait_for(reader.read(), 30)


async def idle_flood(host: str, port: int, count: int) -> None:
    connections = []
    for _ in range(count):
        connections.append(await asyncio.open_connection(host, port))
    await asyncio.gather(*(_closed(reader) for reader, _ in connections), return_exceptions=True)
    for _, writer in connections:
        writer.close()


async def half_heads(host: str, port: int, count: int) -> None:
    connections = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: lag\r\nX-Slow: ")
        connections.append((reader, writer))
    await asyncio.gather(*(_closed(reader) for reader, _ in connections), return_exceptions=True)
    for _, writer in connections:
        writer.close()


async def malformed(host: str, port: int, request: bytes) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await _closed(reader)
    writer.close()


async def unknown_fields(http: aiohttp.ClientSession, base_url: str) -> None:
    body = {"prompt": "Hi", "max_tokens": 1, **{f"unknown_{i:06d}": i for i in range(100_000)}}
    async with http.post(base_url + "/v1/completions", data=orjson.dumps(body),
                         headers={"Content-Type": "application/json"}) as response:
        await response.read()


async def measure(args, base_url: str) -> dict:
    host, port = base_url.removeprefix("http://").rsplit(":", 1)
    port = int(port)
    kinds = {f"{args.idle_connections} idle connections": lambda: idle_flood(host, port, args.idle_connections),
             f"{args.half_heads} half-sent heads": lambda: half_heads(host, port, args.half_heads),
             **{f"malformed: {name}": (lambda request=request: malformed(host, port, request))
                for name, request in MALFORMED.items()}}
    report = {}
    async with aiohttp.ClientSession() as http:
        kinds["100,000 unknown fields"] = lambda: unknown_fields(http, base_url)
        for name, action in kinds.items():
            before = await _lag_histogram(http, base_url)
            await action()
            await asyncio.sleep(0.1)
            report[name] = _worst(before, await _lag_histogram(http, base_url))
            print(f"{name:45s} {report[name]}", flush=True)
    return report


async def _wait_healthy(url: str, process: subprocess.Popen) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(600):
            if process.poll() is not None:
                raise SystemExit("hostile_lag: the server exited during start-up")
            try:
                async with http.get(url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("hostile_lag: the server did not become healthy")


async def async_main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    raise_open_file_limit()  # this client holds --idle-connections sockets at once
    process = None
    base_url = args.base_url
    if base_url is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        process = subprocess.Popen([sys.executable, "-m", "asyncserve.cli", "--model", "asyncserve/tiny-random",
                                    "--host", "127.0.0.1", "--port", str(port), "--disable-log-requests",
                                    "--disable-log-stats", "--max-connections", str(args.max_connections)],
                                   stderr=subprocess.DEVNULL, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        base_url = f"http://127.0.0.1:{port}"
        await _wait_healthy(base_url, process)
    try:
        report = await measure(args, base_url.rstrip("/"))
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    asyncio.run(async_main())
