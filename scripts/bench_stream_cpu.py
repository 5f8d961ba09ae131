"""What a streamed token costs the server's CPU, next to the same engine offline, and the event loop's worst lag
under a burst of streaming requests that all arrive at once (as `vllm bench serve` sends them).

    python scripts/bench_stream_cpu.py                                  # tiny model, CPU: 256 streams x 128 tokens
    python scripts/bench_stream_cpu.py --endpoint chat --num-streams 64
    python scripts/bench_stream_cpu.py --model DIR --device cuda        # the GPU machine
    python scripts/bench_stream_cpu.py --engine-arg max_model_len=2048 --engine-arg enforce_eager=true

Three processes, so that nobody's CPU is counted for another: the server (this script with --role server:
asyncserve's app, as the CLI runs it, plus one private route that reports the process's CPU time, its
threads' CPU time and the LagMonitor's worst lag since the last call), the offline baseline (--role offline:
`LLM.generate` on the same model, prompts and token counts), and this one, the client. Every stream asks for
`ignore_eos` and a fixed `max_tokens`, so both sides produce the same tokens; server CPU per token is the
server process's CPU time (all its threads: the loop, the step thread, torch's) over the burst divided by the
tokens streamed, offline CPU per token the offline process's CPU time over `generate` divided by the same count.
A warm-up burst (short outputs) runs before the measured rounds on both sides.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOW_ROUTE = "/bench/window"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_stream_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="Checkpoint (default: the built-in tiny model).")
    parser.add_argument("--device", default="cpu", help="Passed to the engine: cpu, cuda, auto.")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="More EngineConfig fields for both server and offline (VALUE read as JSON when it "
                             "parses, else as a string); repeatable.")
    parser.add_argument("--endpoint", choices=("completions", "chat", "both"), default="completions")
    parser.add_argument("--num-streams", type=int, default=256, help="Concurrent streams, all sent at once.")
    parser.add_argument("--max-tokens", type=int, default=128, help="Tokens per stream (ignore_eos).")
    parser.add_argument("--prompt-len", type=int, default=32, help="Prompt tokens per stream (random ids).")
    parser.add_argument("--rounds", type=int, default=2, help="Measured bursts per endpoint (median reported).")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="max_tokens of the warm-up burst.")
    parser.add_argument("--skip-offline", action="store_true", help="No offline baseline.")
    parser.add_argument("--json", default=None, help="Write the figures here as JSON.")
    parser.add_argument("--role", choices=("client", "server", "offline"), default="client", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--process-only", action="store_true",
                        help="No server: the engine's `process` alone (appends, detokenizing, stops, the outputs "
                             "a streaming sink gets), timed serially in this process after gc.freeze() as the "
                             "server does, so no step thread competes for the GIL: loop-side engine us/token.")
    parser.add_argument("--stall-stacks", default=None, metavar="FILE",
                        help="Sample the server's event-loop thread every 2 ms from a watchdog thread and write, "
                             "to FILE, the stacks it was in while the loop had not ticked for 15 ms or more "
                             "(what the worst lag is made of), most frequent first.")
    parser.add_argument("--emulate-device-ms", type=float, default=None, metavar="MS",
                        help="Server only: each step's forward is replaced by a sleep of MS milliseconds (the GIL "
                             "released, as while a CUDA graph replays) returning random hidden states, so the loop "
                             "competes only with the step's host work, as on a GPU machine: the serving side's lag "
                             "and CPU without the CPU model's Python (tokens: the LM head's argmax of noise).")
    parser.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                        help="The server process's GIL switch interval (sys.setswitchinterval; Python's default "
                             "is 0.005): how long the loop may wait for the GIL held by the step thread.")
    parser.add_argument("--profile", default=None, metavar="FILE",
                        help="cProfile the server's event-loop thread into FILE (pstats format).")
    return parser


def engine_kwargs(args) -> dict:
    from asyncserve.checkpoints.default_model import TINY_MODEL
    kwargs = {"model": args.model or TINY_MODEL, "device": args.device, "max_num_seqs": args.num_streams,
              "seed": 0, "disable_log_stats": True}
    for item in args.engine_arg:
        key, _, value = item.partition("=")
        try:
            kwargs[key] = json.loads(value)
        except ValueError:
            kwargs[key] = value
    return kwargs


def prompt_ids(args, vocab_size: int, seed: int = 0) -> list[list[int]]:
    import random
    rng = random.Random(seed)
    high = min(vocab_size, 50_000) - 1
    return [[rng.randint(10, high) for _ in range(args.prompt_len)] for _ in range(args.num_streams)]


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads by role: the event loop (main thread), Python worker threads
    by name prefix, and the rest (torch's intra-op threads)."""
    tick = os.sysconf("SC_CLK_TCK")
    named = {thread.native_id: thread.name for thread in threading.enumerate()}
    main_id = threading.main_thread().native_id
    totals: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / tick
        name = "loop" if int(tid) == main_id else named.get(int(tid), "other").rsplit("_", 1)[0]
        totals[name] = totals.get(name, 0.0) + seconds
    return totals


# ---- the server --------------------------------------------------------------------------------------


def emulate_device(seconds: float) -> None:
    """Every runner's forward becomes a sleep of `seconds` returning random hidden states (see
    --emulate-device-ms)."""
    import torch
    from asyncserve.runner.model_runner import ModelRunner

    def forward_step(self, batch, inputs):
        time.sleep(seconds)
        hidden_size = self.model.hf_config.hidden_size  # random states: varied tokens and text, as a model's
        return torch.randn(inputs.input_ids.shape[0], hidden_size, dtype=self.config.model.dtype, device=self.device)

    ModelRunner.forward_step = forward_step


def serve(args) -> None:
    from aiohttp import web

    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)

    from asyncserve.cli import new_event_loop
    from asyncserve.config import EngineConfig
    from asyncserve.engine.async_engine import AsyncEngine
    from asyncserve.server import SERVER_STATE, openai_app
    from asyncserve.server.run import serve as serve_app
    from asyncserve.server.stall_stacks import STALL_STACKS_ENV

    if args.emulate_device_ms is not None:
        emulate_device(args.emulate_device_ms / 1e3)
    engine = AsyncEngine(EngineConfig(**engine_kwargs(args)))
    app = openai_app(engine, log_requests=False)

    async def window(request: web.Request) -> web.Response:
        state = request.app[SERVER_STATE]
        stats = engine.stats()
        return web.json_response({"cpu_s": time.process_time(), "threads": thread_cpu(),
                                  "lag_max_s": state.lag.reset(), "generation_tokens": stats["generation_tokens_total"],
                                  "vocab_size": engine.vocab_size, "steps": stats.get("engine_steps_total", 0),
                                  "process_s": stats.get("engine_process_seconds_total", 0.0),
                                  "schedule_s": stats.get("engine_schedule_seconds_total", 0.0)})

    app.router.add_get(WINDOW_ROUTE, window)

    def announce(addresses) -> None:
        print(f"PORT {addresses[0][1]}", flush=True)

    if args.stall_stacks:  # the server's own sampler (asyncserve/server/stall_stacks.py), started with the app
        os.environ[STALL_STACKS_ENV] = args.stall_stacks
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve_app(app, "127.0.0.1", args.port, on_started=announce, access_log=None))
    finally:
        loop.close()
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(args.profile)


# ---- the offline baseline -------------------------------------------------------------------------------


def offline(args) -> None:
    from asyncserve import LLM, SamplingParams

    llm = LLM(**engine_kwargs(args))
    prompts = prompt_ids(args, llm.llm_engine.config.model.vocab_size)
    inputs = [{"prompt_token_ids": ids} for ids in prompts]
    llm.generate(inputs, SamplingParams(max_tokens=args.warmup_tokens, ignore_eos=True, temperature=0),
                 use_tqdm=False)
    rounds = []
    for _ in range(args.rounds):
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0)
        cpu, wall = time.process_time(), time.perf_counter()
        outputs = llm.generate(inputs, params, use_tqdm=False)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        tokens = sum(len(choice.token_ids) for output in outputs for choice in output.outputs)
        rounds.append({"cpu_s": cpu, "wall_s": wall, "tokens": tokens})
    print("RESULT " + json.dumps(rounds), flush=True)


def process_only(args) -> dict:
    """`LLMEngine.process` per streamed token, serially: schedule, execute, then time `process` alone. The
    requests are a streaming sink's (delta outputs, where the engine has them), sampled with ignore_eos."""
    import gc
    import inspect

    from asyncserve import SamplingParams
    from asyncserve.config import EngineConfig
    from asyncserve.engine.llm_engine import LLMEngine

    kwargs = engine_kwargs(args)
    kwargs.setdefault("max_model_len", max(2048, args.prompt_len + args.max_tokens))
    engine = LLMEngine(EngineConfig(**kwargs))
    engine.stream_outputs = True
    delta = {"delta": True} if "delta" in inspect.signature(engine.add_request).parameters else {}
    for index, ids in enumerate(prompt_ids(args, engine.config.model.vocab_size)):
        params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=1.0, seed=index)
        engine.add_request(f"r{index}", engine.input_processor.process({"prompt_token_ids": ids}, params),
                           **delta)
    gc.collect()
    gc.freeze()
    spent = 0.0
    while engine.has_unfinished_requests():
        message, scheduled = engine.schedule()
        if scheduled:
            result = engine.executor.execute(message)
            started = time.thread_time()  # CPU time: other processes on the machine do not count
            engine.process(scheduled, result)
            spent += time.thread_time() - started
    tokens = args.num_streams * args.max_tokens
    figures = {"process_us_per_token": 1e6 * spent / tokens, "delta_outputs": bool(delta), "tokens": tokens}
    print(f"engine process per streamed token: {figures['process_us_per_token']:.1f} us "
          f"({args.num_streams} streams x {args.max_tokens} tokens, delta outputs: {bool(delta)})")
    return figures


# ---- the client ------------------------------------------------------------------------------------------


def _python_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _role_command(args, role: str) -> list[str]:
    command = [sys.executable, os.path.abspath(__file__), "--role", role, "--device", args.device,
               "--num-streams", str(args.num_streams), "--max-tokens", str(args.max_tokens),
               "--prompt-len", str(args.prompt_len), "--rounds", str(args.rounds),
               "--warmup-tokens", str(args.warmup_tokens)]
    if args.model:
        command += ["--model", args.model]
    if args.emulate_device_ms is not None and role == "server":
        command += ["--emulate-device-ms", str(args.emulate_device_ms)]
    if args.profile and role == "server":
        command += ["--profile", os.path.abspath(args.profile)]
    if args.switch_interval and role == "server":
        command += ["--switch-interval", str(args.switch_interval)]
    if args.stall_stacks and role == "server":
        command += ["--stall-stacks", os.path.abspath(args.stall_stacks)]
    for item in args.engine_arg:
        command += ["--engine-arg", item]
    return command


def run_offline(args) -> list[dict]:
    done = subprocess.run(_role_command(args, "offline"), env=_python_env(), cwd=ROOT, capture_output=True,
                          text=True, check=False)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"bench_stream_cpu: the offline run failed:\n{done.stderr[-3000:]}")


class Server:
    """The server process; its port is read from its first line."""

    def __init__(self, args):
        self.process = subprocess.Popen(_role_command(args, "server"), env=_python_env(), cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.process.kill()
            raise RuntimeError(f"bench_stream_cpu: the server did not start:\n{self.process.stderr.read()[-3000:]}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}"
        # Its log goes on being read, so that a full pipe never blocks it.
        threading.Thread(target=self.process.stderr.read, daemon=True).start()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _stream(session, url: str, body: dict) -> tuple[int, int]:
    """(completion tokens from the usage chunk, SSE events with content): parsed from the tail only, so
    that the client's own CPU stays small beside the server's."""
    tail, events = b"", 0
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        async for chunk in response.content.iter_any():
            events += chunk.count(b"data: ")
            tail = (tail + chunk)[-4096:]
    frames = [frame for frame in tail.split(b"\n\n") if frame.startswith(b"data: {")]
    usage = json.loads(frames[-1][len(b"data: "):])["usage"]
    return usage["completion_tokens"], events


def _body(endpoint: str, ids: list[int], max_tokens: int, words: list[str]) -> dict:
    body = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": " ".join(words[i % len(words)] for i in ids)}]
    else:
        body["prompt"] = ids
    return body


async def burst(server: Server, endpoint: str, prompts: list[list[int]], max_tokens: int) -> dict:
    import aiohttp
    words = ["alpha", "river", "stone", "blue", "quick", "house", "light", "seven", "paper", "wind"]
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        bodies = [_body(endpoint, ids, max_tokens, words) for ids in prompts]
        async with session.get(server.url + WINDOW_ROUTE) as response:
            before = await response.json()
        wall = time.perf_counter()
        results = await asyncio.gather(*(_stream(session, server.url + path, body) for body in bodies))
        wall = time.perf_counter() - wall
        async with session.get(server.url + WINDOW_ROUTE) as response:
            after = await response.json()
    tokens = sum(count for count, _ in results)
    if tokens != len(prompts) * max_tokens:
        raise RuntimeError(f"bench_stream_cpu: {tokens} tokens streamed, expected {len(prompts) * max_tokens}")
    threads = {name: after["threads"].get(name, 0.0) - before["threads"].get(name, 0.0)
               for name in after["threads"]}
    return {"cpu_s": after["cpu_s"] - before["cpu_s"], "wall_s": wall, "tokens": tokens,
            "events": sum(events for _, events in results), "lag_max_s": after["lag_max_s"], "threads": threads,
            "engine_tokens": after["generation_tokens"] - before["generation_tokens"],
            "steps": after["steps"] - before["steps"],
            # the loop's synchronous work per step: processing step N's outputs and delivering them
            # (with the sinks: framing and writing), and scheduling step N+1
            "loop_ms_per_step": {key: 1e3 * (after[f"{key}_s"] - before[f"{key}_s"]) / max(1, after["steps"] - before["steps"])
                                 for key in ("process", "schedule")}}


def _median(rounds: list[dict], key) -> float:
    return statistics.median(key(r) for r in rounds)


def summarize(endpoint: str, served: list[dict], offline_rounds: list[dict] | None) -> dict:
    us_per_token = _median(served, lambda r: r["cpu_s"] / r["tokens"] * 1e6)
    figures = {
        "endpoint": endpoint, "rounds": served,
        "server_cpu_us_per_token": us_per_token,
        "server_loop_thread_us_per_token": _median(served, lambda r: r["threads"].get("loop", 0) / r["tokens"] * 1e6),
        "server_lag_max_ms": _median(served, lambda r: r["lag_max_s"] * 1e3),
        "server_lag_max_ms_worst_round": max(r["lag_max_s"] for r in served) * 1e3,
        "server_tok_s": _median(served, lambda r: r["tokens"] / r["wall_s"]),
    }
    if offline_rounds:
        offline_us = _median(offline_rounds, lambda r: r["cpu_s"] / r["tokens"] * 1e6)
        figures.update({"offline_cpu_us_per_token": offline_us, "ratio": us_per_token / offline_us,
                        "offline_tok_s": _median(offline_rounds, lambda r: r["tokens"] / r["wall_s"])})
    return figures


def report(args, figures: dict) -> str:
    offline_us = figures.get("offline_cpu_us_per_token")
    lines = [(f"--- {figures['endpoint']}: {args.num_streams} streams x {args.max_tokens} tokens, prompt "
              f"{args.prompt_len}, median of {args.rounds} bursts ---")]
    baseline = f" (offline LLM.generate: {offline_us:.1f} us; ratio {figures['ratio']:.2f}x)" if offline_us else ""
    lines.append(f"server CPU per streamed token: {figures['server_cpu_us_per_token']:.1f} us{baseline}")
    threads: dict[str, float] = {}
    for r in figures["rounds"]:
        for name, seconds in r["threads"].items():
            threads[name] = threads.get(name, 0.0) + seconds / r["tokens"] * 1e6 / len(figures["rounds"])
    lines.append("  by thread (us/token): " + ", ".join(f"{name} {value:.1f}" for name, value in
                                                         sorted(threads.items(), key=lambda item: -item[1])))
    lines.append(f"event loop worst lag: {figures['server_lag_max_ms']:.1f} ms (target <= 20 ms; worst round "
                 f"{figures['server_lag_max_ms_worst_round']:.1f} ms)")
    per_step = figures["rounds"][-1]["loop_ms_per_step"]
    lines.append(f"  the loop's work per step (mean of {figures['rounds'][-1]['steps']} steps): process+deliver "
                 f"{per_step['process']:.1f} ms, schedule {per_step['schedule']:.1f} ms")
    offline_rate = f" (offline LLM.generate: {figures['offline_tok_s']:.0f} tok/s)" if offline_us else ""
    lines.append(f"output tok/s streamed: {figures['server_tok_s']:.0f}{offline_rate}")
    return "\n".join(lines)


async def client(args) -> dict:
    server = Server(args)
    try:
        import aiohttp
        async with aiohttp.ClientSession() as session, session.get(server.url + WINDOW_ROUTE) as response:
            vocab_size = (await response.json())["vocab_size"]
        prompts = prompt_ids(args, vocab_size)
        endpoints = ["completions", "chat"] if args.endpoint == "both" else [args.endpoint]
        served = {}
        for endpoint in endpoints:
            await burst(server, endpoint, prompts, args.warmup_tokens)
            served[endpoint] = [await burst(server, endpoint, prompts, args.max_tokens) for _ in range(args.rounds)]
    finally:
        server.stop()
    offline_rounds = None if args.skip_offline else run_offline(args)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    out = {"machine": machine, "args": {k: v for k, v in vars(args).items() if k not in ("role", "port")},
           "endpoints": {endpoint: summarize(endpoint, rounds, offline_rounds) for endpoint, rounds in served.items()}}
    if offline_rounds:
        out["offline_rounds"] = offline_rounds
    return out


def main(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.role == "server":
        serve(args)
        return None
    if args.role == "offline":
        offline(args)
        return None
    if args.process_only:
        figures = process_only(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
        return figures
    try:
        import uvloop
        results = uvloop.run(client(args))
    except ImportError:
        results = asyncio.run(client(args))
    for figures in results["endpoints"].values():
        print(report(args, figures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
