"""Where the engine loop's time goes, per phase of the pipelined step: what explains a server that is
slower than its GPU. Four clock reads a step; exported in `/metrics` and the periodic stats line.

`ASYNCSERVE_STEP_TRACE=FILE` also writes one JSON line per step (when it ended, its phases in ms, what it
scheduled): the profile behind a benchmark's time to first token under load. Off by default."""
from __future__ import annotations

import os
import time

import orjson

TRACE_ENV = "ASYNCSERVE_STEP_TRACE"

PHASES = ("schedule", "process", "wait_device", "wait_launch", "grammar")


class StepProfile:
    """Seconds the loop spent in each phase: scheduling step N+1, processing and delivering step N,
    waiting for step N's results, waiting for the worker to finish launching step N+1, and (structured
    outputs only) filling step N+1's grammar masks and sampling it."""

    def __init__(self, trace_path: str | None = None) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.num_steps = 0
        self._last = time.perf_counter()
        trace_path = trace_path if trace_path is not None else os.environ.get(TRACE_ENV)
        self._trace = open(trace_path, "ab", buffering=1 << 16) if trace_path else None  # noqa: SIM115 (open while the engine is)
        self._step_start = dict(self.seconds)

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

    def end_step(self, scheduled: list, num_waiting: int) -> None:
        """Counts a step; with a trace, writes its line: this iteration's phases (ms), and what it launched:
        sequences, prompt tokens (those scheduled more than one token), all tokens, requests still waiting."""
        self.num_steps += 1
        if self._trace is None:
            return
        phases = {phase: round(1e3 * (value - self._step_start[phase]), 3) for phase, value in self.seconds.items()}
        self._step_start = dict(self.seconds)
        num_tokens = sum(num_new for _, num_new in scheduled)
        prefill_tokens = sum(num_new for _, num_new in scheduled if num_new > 1)
        self._trace.write(orjson.dumps({"t": time.time(), **phases, "seqs": len(scheduled),
                                        "prefill_tokens": prefill_tokens, "tokens": num_tokens,
                                        "waiting": num_waiting}) + b"\n")

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def stats(self) -> dict[str, float]:
        stats = {f"engine_{phase}_seconds_total": value for phase, value in self.seconds.items()}
        stats["engine_steps_total"] = self.num_steps
        return stats

    def line(self, previous: dict[str, float] | None) -> str:
        """Mean milliseconds per step of each phase since `previous` (an earlier `stats()`)."""
        now = self.stats()
        previous = previous or dict.fromkeys(now, 0)
        steps = now["engine_steps_total"] - previous["engine_steps_total"]
        if not steps:
            return "no steps"
        return ", ".join(f"{phase} {1e3 * (now[f'engine_{phase}_seconds_total'] - previous[f'engine_{phase}_seconds_total']) / steps:.2f}"
                         for phase in PHASES) + f" ms/step over {steps} steps"
