"""Event-loop lag: how late a 10 ms sleep wakes up tells how long something held the loop."""
from __future__ import annotations

import asyncio
import logging

from asyncserve.server.metrics import LAG_BUCKETS, Histogram
from asyncserve.utils.tasks import cancel_and_wait

logger = logging.getLogger("asyncserve.server")

# A window whose worst lag passes this is logged (issue 22's bound for a loaded server): a benchmark's
# server log then shows where the loop stalled without scraping /metrics.
LOGGED_LAG = 0.020


class LagMonitor:
    def __init__(self, interval: float = 0.01, log_window: float = 10.0):
        self.interval = interval
        self.log_window = log_window
        self.max_lag = 0.0  # since start-up or the last reset()
        self._logged_window_max = 0.0  # since the last log window began
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
        window_end = loop.time() + self.log_window
        while True:
            before = loop.time()
            await asyncio.sleep(interval)
            now = loop.time()
            lag = max(0.0, now - before - interval)
            self.histogram.observe(lag)
            if lag > self.max_lag:
                self.max_lag = lag
            if lag > self._logged_window_max:
                self._logged_window_max = lag
            if now >= window_end:
                window_end = now + self.log_window
                worst, self._logged_window_max = self._logged_window_max, 0.0
                if worst > LOGGED_LAG:
                    logger.info("event loop: worst lag %.1f ms in the last %.0f s", worst * 1e3, self.log_window)
