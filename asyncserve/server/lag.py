"""Event-loop lag: how late a 10 ms sleep wakes up tells how long something held the loop."""
from __future__ import annotations

import asyncio

from asyncserve.server.metrics import LAG_BUCKETS, Histogram
from asyncserve.utils.tasks import cancel_and_wait


class LagMonitor:
    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.max_lag = 0.0
        self.histogram = Histogram("event_loop_lag_seconds", "How late the loop woke a 10 ms sleep.",
                                   LAG_BUCKETS)
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="asyncserve-lag-monitor")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    def reset(self) -> float:
        """Returns the worst lag so far and starts a new window."""
        worst, self.max_lag = self.max_lag, 0.0
        return worst

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            lag = max(0.0, loop.time() - before - interval)
            self.histogram.observe(lag)
            if lag > self.max_lag:
                self.max_lag = lag
