"""Where the engine loop's time goes, per phase of the pipelined step: what explains a server that is
slower than its GPU. Four clock reads a step; exported in `/metrics` and the periodic stats line."""
from __future__ import annotations

import time

PHASES = ("schedule", "process", "wait_device", "wait_launch", "grammar")


class StepProfile:
    """Seconds the loop spent in each phase: scheduling step N+1, processing and delivering step N,
    waiting for step N's results, waiting for the worker to finish launching step N+1, and (structured
    outputs only) filling step N+1's grammar masks and sampling it."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.num_steps = 0
        self._last = time.perf_counter()

    def start(self) -> None:
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._last
        self._last = now

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
