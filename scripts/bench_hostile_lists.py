"""Hostile sampling lists against a live server: one request with a huge `bad_words` list, one n=16 request
with a full-vocabulary `logit_bias`, each while small requests and `/health` probes run beside it.

    python scripts/bench_hostile_lists.py --serve-tiny
    python scripts/bench_hostile_lists.py --base-url http://127.0.0.1:8000 --vocab-size 151936

`--serve-tiny` starts `asyncserve --model asyncserve/tiny-random` (vocabulary 768) on a free port.
For each phase (small requests alone, then beside each hostile request) it prints: the small requests'
latency (median and worst), the worst `/health` latency seen by a probe every 10 ms, the server's own
loop-lag samples over 50 ms, 100 ms and 1 s (from /metrics) and its worst loop lag since start-up, and the
hostile request's status and time. Not part of CI: run it on demand.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time

import aiohttp

from soak import _free_port, _lag_samples_over, _metrics, _wait_healthy  # scripts/ is on sys.path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_hostile_lists", description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", help="Server root, e.g. http://127.0.0.1:8000.")
    parser.add_argument("--serve-tiny", action="store_true", help="Start asyncserve on asyncserve/tiny-random.")
    parser.add_argument("--vocab-size", type=int, default=768, help="The served model's vocabulary.")
    parser.add_argument("--bad-words", type=int, nargs="+", default=[60_000, 150_000],
                        help="Sizes of the bad_words lists sent, one hostile request each.")
    parser.add_argument("--bias-n", type=int, default=16, help="n of the logit_bias request.")
    parser.add_argument("--bias-max-tokens", type=int, default=64)
    parser.add_argument("--small-concurrency", type=int, default=2, help="Small requests in flight at once.")
    parser.add_argument("--small-max-tokens", type=int, default=4)
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--result-json", help="Also write the report here.")
    return parser


def _words(count: int) -> list[str]:
    """Distinct made-up words: the tokenizer's word cache cannot make them cheap."""
    rng = random.Random(count)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(4, 10))) for _ in range(count)]


class Probe:
    """Small requests and /health probes, running until stopped; what each saw."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, model: str, args) -> None:
        self.session, self.base_url, self.model, self.args = session, base_url, model, args
        self.latencies: list[float] = []
        self.health_worst = 0.0
        self.errors = 0
        self._stopped = asyncio.Event()

    async def _small(self) -> None:
        body = {"model": self.model, "prompt": "Hello there", "max_tokens": self.args.small_max_tokens,
                "temperature": 0.0, "ignore_eos": True}
        while not self._stopped.is_set():
            start = time.monotonic()
            async with self.session.post(self.base_url + "/v1/completions", json=body) as response:
                await response.read()
                if response.status != 200:
                    self.errors += 1
            self.latencies.append(time.monotonic() - start)

    async def _health(self) -> None:
        while not self._stopped.is_set():
            start = time.monotonic()
            async with self.session.get(self.base_url + "/health") as response:
                await response.read()
            self.health_worst = max(self.health_worst, time.monotonic() - start)
            await asyncio.sleep(0.01)

    async def run_while(self, work) -> object:
        tasks = [asyncio.create_task(self._small()) for _ in range(self.args.small_concurrency)]
        tasks.append(asyncio.create_task(self._health()))
        try:
            return await work
        finally:
            self._stopped.set()
            await asyncio.gather(*tasks)

    def report(self) -> dict:
        latencies = self.latencies or [float("nan")]
        return {"small_requests": len(self.latencies), "small_median_s": round(statistics.median(latencies), 3),
                "small_worst_s": round(max(latencies), 3), "small_errors": self.errors,
                "health_worst_s": round(self.health_worst, 3)}


async def _hostile(session, base_url: str, body: dict) -> dict:
    start = time.monotonic()
    async with session.post(base_url + "/v1/completions", json=body) as response:
        payload = await response.json()
    result = {"status": response.status, "seconds": round(time.monotonic() - start, 2)}
    if response.status != 200:
        result["error"] = payload["error"]["message"][:160]
    return result


async def _phase(session, base_url: str, model: str, args, name: str, hostile_body: dict | None) -> dict:
    before = await _metrics(session, base_url)
    probe = Probe(session, base_url, model, args)
    if hostile_body is None:
        work = asyncio.sleep(args.baseline_seconds)
    else:
        async def work_after_warm_probes():
            await asyncio.sleep(0.5)  # the small requests are flowing when the hostile one arrives
            return await _hostile(session, base_url, hostile_body)
        work = work_after_warm_probes()
    hostile = await probe.run_while(work)
    after = await _metrics(session, base_url)
    report = {"phase": name, **probe.report(),
              "server_lag_samples_over_50ms": _lag_samples_over(after, "0.05") - _lag_samples_over(before, "0.05"),
              "server_lag_samples_over_100ms": _lag_samples_over(after, "0.1") - _lag_samples_over(before, "0.1"),
              "server_lag_samples_over_1s": _lag_samples_over(after, "1.0") - _lag_samples_over(before, "1.0"),
              "server_worst_lag_since_start_s": round(after.get("event_loop_lag_seconds_max", 0.0), 3)}
    if hostile is not None:
        report["hostile"] = hostile
    print(json.dumps(report), flush=True)
    return report


async def run(args, base_url: str) -> list[dict]:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        async with session.get(base_url + "/v1/models") as response:
            model = (await response.json())["data"][0]["id"]
        reports = [await _phase(session, base_url, model, args, "small requests alone", None)]
        for count in args.bad_words:
            body = {"model": model, "prompt": "Hello there", "max_tokens": 4, "bad_words": _words(count)}
            reports.append(await _phase(session, base_url, model, args, f"bad_words of {count} words", body))
        bias = {str(token_id): 0.5 for token_id in range(args.vocab_size)}
        body = {"model": model, "prompt": "Hello there", "n": args.bias_n, "max_tokens": args.bias_max_tokens,
                "temperature": 1.0, "seed": 0, "ignore_eos": True, "logit_bias": bias}
        reports.append(await _phase(session, base_url, model, args,
                                    f"n={args.bias_n} with a {args.vocab_size}-entry logit_bias", body))
    return reports


async def async_main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if bool(args.base_url) == bool(args.serve_tiny):
        raise SystemExit("bench_hostile_lists: give exactly one of --base-url or --serve-tiny")
    process = None
    if args.serve_tiny:
        port = _free_port()
        process = subprocess.Popen([sys.executable, "-m", "asyncserve.cli", "--model", "asyncserve/tiny-random",
                                    "--host", "127.0.0.1", "--port", str(port), "--disable-log-requests",
                                    "--disable-log-stats"],
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        base_url = f"http://127.0.0.1:{port}"
        await _wait_healthy(base_url, process)
    else:
        base_url = args.base_url.rstrip("/")
    try:
        reports = await run(args, base_url)
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(reports, f, indent=2)
    return reports


if __name__ == "__main__":
    asyncio.run(async_main())
