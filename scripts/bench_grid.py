"""Issue 11's whole comparison grid for asyncserve in one GPU call, next to vLLM's figures, into one JSON file.

    python scripts/bench_grid.py --out $OUT/grid.json                 # everything, within ~9.5 minutes
    python scripts/bench_grid.py --out grid.json --only online        # or offline, latency (repeatable)

Online: `asyncserve --model DIR --load-format dummy` as a subprocess on the llama-3.1-8b directory that
scripts/bench_models.py writes, loaded by scripts/bench_serving.py with `vllm bench serve`'s workload (random,
input 512, output 128, ignore EOS) at concurrency 1/64/256 (16/256/1024 prompts). Offline: bench_throughput.py
(512 requests, prompts 255..765, 128 out) and bench_latency.py (batch-1 decode, 8B and 0.5B), each in its own
process so every part gets the whole GPU. Every part has a time limit inside one overall budget; the JSON is
rewritten after each part, so a part that fails or runs out of time leaves the others' figures.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone

SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, SCRIPTS)

import bench_models  # noqa: E402
import bench_serving  # noqa: E402

VLLM_SOURCE = "vLLM 0.26.0, measured 2026-11-24 on H100 (issue 11)"
# workload -> metric -> (vLLM 0.26.0, asyncserve before issue 11); TPOT and TTFT are vLLM's mean figures.
REFERENCE = {
    "online_c1": {"output_throughput": (148.5, 135.6), "mean_tpot_ms": (6.58, 7.21)},
    "online_c64": {"output_throughput": (4278, 2704), "mean_tpot_ms": (10.6, 17.0), "mean_ttft_ms": (555, 855)},
    "online_c256": {"output_throughput": (6192, 4559), "mean_tpot_ms": (28.4, 48.6),
                    "mean_ttft_ms": (1627, 960)},
    "offline_throughput": {"total_token_throughput": (34006, 27779)},
    "latency_llama-3.1-8b": {"tokens_per_s": (145.5, 159.1)},
    "latency_qwen2.5-0.5b": {"tokens_per_s": (425.7, 903)},
    "startup": {"startup_s": (129, 7)},  # vLLM took 129-140 s
}
OFFLINE_S, LATENCY_S = 170.0, 100.0  # each offline part's limit (start-up and warm-up included)
LOWER_IS_BETTER = ("_ms", "startup_s")
# Issue 11's targets: (workload, metric, bound, "min" or "max").
TARGETS = [
    ("online_c64", "output_throughput", 4700, "min"), ("online_c256", "output_throughput", 6800, "min"),
    ("online_c64", "mean_tpot_ms", 10.0, "max"), ("offline_throughput", "total_token_throughput", 37500, "min"),
    ("latency_qwen2.5-0.5b", "tokens_per_s", 1500, "min"), ("latency_llama-3.1-8b", "fraction_of_floor", 0.85, "min"),
    ("startup", "startup_s", 20.0, "max"), ("online_c256", "server_loop_lag_max_ms", 20.0, "max"),
]
NOTES = ("TPOT/TTFT/ITL are vLLM's definitions (bench_serving.py); ratio > 1 means asyncserve is better. "
         "server_loop_lag_max_ms counts from the server's start-up (warm-up and earlier runs included); "
         "server_loop_lag_run_bound_ms is the histogram bucket edge that holds the worst lag of that run alone.")
SERVING_KEYS = ("completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
                "output_throughput", "total_token_throughput", "max_output_tokens_per_s", "max_concurrent_requests",
                "server_loop_lag_max_ms", "server_loop_lag_mean_ms")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--only", action="append", choices=("online", "offline", "latency"),
                        help="run only these parts (repeatable; default: all)")
    parser.add_argument("--model", default="llama-3.1-8b", help="scripts/model_configs name or config path")
    parser.add_argument("--small-model", default="qwen2.5-0.5b", help="the second batch-1 decode model")
    parser.add_argument("--online-grid", default="1:16,64:256,256:1024", help="CONCURRENCY:PROMPTS,...")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--server-args", default="", help="extra asyncserve arguments, one shell string")
    parser.add_argument("--server-start-timeout", type=float, default=150.0)
    parser.add_argument("--budget-s", type=float, default=560.0, help="the whole grid's time limit")
    parser.add_argument("--work-dir", default=None, help="logs and per-part figures (default: a temp dir)")
    parser.add_argument("--models-dir", default=None, help="where model directories go (default: WORK_DIR/models)")
    parser.add_argument("--dry-run", action="store_true", help="write the plan and the reference figures only")
    return parser


def parse_grid(text: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.split(":")) for item in text.split(",") if item]


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self, cap: float | None = None) -> float:
        left = max(0.0, self.deadline - time.monotonic())
        return min(left, cap) if cap is not None else left


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, port: int, extra: str) -> list[str]:
    return [sys.executable, "-m", "asyncserve.cli",
            "--model", model, "--load-format", "dummy", "--host", "127.0.0.1", "--port", str(port),
            "--disable-log-requests", *shlex.split(extra)]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_ready(url: str, process: subprocess.Popen, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        if _ready(url):
            return time.perf_counter() - started
        time.sleep(0.2)
    raise TimeoutError(f"the server was not ready in {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def serving_args(url: str, model: str, concurrency: int, prompts: int, args) -> list[str]:
    """`vllm bench serve`'s own flags for issue 11's online rows."""
    return ["--base-url", url, "--backend", "vllm", "--model", model, "--tokenizer", model,
            "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0"]


def run_online(args, budget: Budget, record: dict, save, reserve: float = 0.0) -> None:
    """The server once, the online rows against it; `reserve` seconds of the budget stay for later parts."""
    models_dir = args.models_dir or os.path.join(args.work_dir, "models")
    model = bench_models.model_dir(args.model, os.path.join(models_dir, os.path.basename(args.model.rstrip("/"))))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = os.path.join(args.work_dir, "server.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen(server_command(model, port, args.server_args), stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        startup = wait_ready(url, process, budget.left(args.server_start_timeout))
        record["startup"] = {"startup_s": startup}
        print(f"asyncserve ready in {startup:.1f} s on {model}", flush=True)
        for concurrency, prompts in parse_grid(args.online_grid):
            name = f"online_c{concurrency}"
            try:
                full = _run_async(bench_serving.async_main(serving_args(url, model, concurrency, prompts, args)),
                                  max(30.0, budget.left() - reserve))
                record[name] = {key: full[key] for key in full if key in SERVING_KEYS or key.endswith("_ms")}
                record[name].update(max_concurrency=concurrency, num_prompts=prompts)
            except Exception as exc:  # one run's failure leaves the others
                record[name] = {"error": f"{type(exc).__name__}: {exc}"}
            save()
    except Exception as exc:
        record["online_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop(process)
        record.setdefault("logs", {})["server"] = log_path
        save()


def _run_async(coroutine, timeout: float):
    async def bounded():
        return await asyncio.wait_for(coroutine, timeout)
    try:
        import uvloop
        return uvloop.run(bounded())
    except ImportError:
        return asyncio.run(bounded())


def run_script(name: str, script: str, script_args: list[str], timeout: float, args, record: dict) -> None:
    """One offline benchmark in its own process (the whole GPU to itself); its --json figures into record."""
    out = os.path.join(args.work_dir, f"{name}.json")
    log_path = os.path.join(args.work_dir, f"{name}.log")
    with open(log_path, "w") as log:
        try:
            done = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), *script_args, "--json", out],
                                  stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=SCRIPTS)
            error = None if done.returncode == 0 else f"exit status {done.returncode}"
        except subprocess.TimeoutExpired:
            error = f"ran past its {timeout:.0f} s"
    if error is None and os.path.exists(out):
        with open(out) as f:
            record[name] = json.load(f)
    else:
        with open(log_path) as f:
            record[name] = {"error": error or "no figures written", "log_tail": f.read()[-2000:]}
    record.setdefault("logs", {})[name] = log_path


def compare(record: dict) -> tuple[list[dict], list[dict]]:
    """Rows of (workload, metric, vLLM, asyncserve before, asyncserve now, ratio), and the targets met or missed.

    ratio is how many times better asyncserve is than vLLM (> 1: better): ours / vLLM for rates,
    vLLM / ours for times.
    """
    rows = []
    for workload, metrics in REFERENCE.items():
        for metric, (vllm, before) in metrics.items():
            ours = record.get(workload, {}).get(metric)
            ratio = None
            if ours:
                ratio = vllm / ours if metric.endswith(LOWER_IS_BETTER) else ours / vllm
            rows.append({"workload": workload, "metric": metric, "vllm": vllm, "asyncserve_before": before,
                         "asyncserve": ours, "ratio": ratio})
    targets = []
    for workload, metric, bound, kind in TARGETS:
        value = record.get(workload, {}).get(metric)
        met = None if value is None else (value >= bound if kind == "min" else value <= bound)
        targets.append({"workload": workload, "metric": metric, "target": f"{'>=' if kind == 'min' else '<='} "
                        f"{bound}", "value": value, "met": met})
    c1, offline = record.get("online_c1", {}), record.get("latency_" + "llama-3.1-8b", {})
    if c1.get("mean_tpot_ms") and offline.get("ms_per_step"):  # issue 11: within 3% of our offline step
        ratio = c1["mean_tpot_ms"] / offline["ms_per_step"]
        targets.append({"workload": "online_c1", "metric": "mean_tpot_ms / offline ms_per_step",
                        "target": "<= 1.03", "value": ratio, "met": ratio <= 1.03})
    return rows, targets


def table(rows: list[dict], targets: list[dict]) -> str:
    def fmt(value):
        return "-" if value is None else f"{value:,.2f}" if isinstance(value, float) else f"{value:,}"
    lines = [f"{'workload':<22} {'metric':<24} {'vLLM 0.26.0':>12} {'before':>10} {'asyncserve':>12} {'ratio':>7}"]
    for row in rows:
        lines.append(f"{row['workload']:<22} {row['metric']:<24} {fmt(row['vllm']):>12} "
                     f"{fmt(row['asyncserve_before']):>10} {fmt(row['asyncserve']):>12} {fmt(row['ratio']):>7}")
    lines.append(f"ratio > 1: asyncserve better than {VLLM_SOURCE}")
    for target in targets:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        lines.append(f"target {target['workload']} {target['metric']} {target['target']}: "
                     f"{fmt(target['value'])} -> {verdict}")
    return "\n".join(lines)


def _device_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                          text=True)
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def plan(args) -> dict:
    parts = args.only or ["online", "offline", "latency"]
    steps = {}
    if "online" in parts:
        steps["online"] = {"server": server_command(f"<{args.model} dir>", 0, args.server_args),
                           "runs": [serving_args("URL", f"<{args.model} dir>", c, n, args)
                                    for c, n in parse_grid(args.online_grid)]}
    if "offline" in parts:
        steps["offline"] = ["bench_throughput.py", "--model", args.model, "--no-hf"]
    if "latency" in parts:
        steps["latency"] = [["bench_latency.py", "--model", m, "--no-hf"] for m in (args.model, args.small_model)]
    return steps


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    budget = Budget(args.budget_s)
    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="asyncserve-grid-")
    os.makedirs(args.work_dir, exist_ok=True)
    parts = args.only or ["online", "offline", "latency"]
    record = {"vllm_source": VLLM_SOURCE, "started": datetime.now(timezone.utc).isoformat(),
              "device": _device_name(), "args": vars(args), "plan": plan(args), "notes": NOTES}

    def save():
        record["comparison"], record["targets"] = compare(record)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)

    if not args.dry_run:
        if "online" in parts:
            reserve = OFFLINE_S * ("offline" in parts) + 2 * LATENCY_S * ("latency" in parts)
            run_online(args, budget, record, save, reserve)
        if "offline" in parts:
            run_script("offline_throughput", "bench_throughput.py", ["--model", args.model, "--no-hf"],
                       budget.left(OFFLINE_S), args, record)
            save()
        if "latency" in parts:
            for model in (args.model, args.small_model):
                run_script(f"latency_{model}", "bench_latency.py", ["--model", model, "--no-hf"],
                           budget.left(LATENCY_S), args, record)
                save()
    save()
    print(table(record["comparison"], record["targets"]))
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
