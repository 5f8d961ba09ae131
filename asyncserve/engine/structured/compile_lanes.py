"""Grammar compiles off the event loop, under a deadline, dropped when nobody waits for them any more.

xgrammar compiles in C++ and cannot be interrupted; it releases the GIL, so a compile in a thread never
holds the loop. What a thread cannot give is cancellation, so the lanes make an abandoned compile cost
nothing but the CPU it is already using:

- Two lanes, one compile running in each: constraints up to SMALL_BYTES of text, and bigger ones. A small
  grammar never waits behind a big one.
- Requests for the same constraint share one compile.
- Each caller waits until its deadline. A compile whose last caller left (deadline, disconnect, cancelled
  task) is abandoned: queued, it never starts; running, its lane starts its next compile on a new thread
  at once, and the abandoned one finishes in the background with its result dropped (never cached).
- At most MAX_ABANDONED abandoned compiles run at a time; while that many do, new compiles are refused
  (503, retry later) rather than stacking more threads on the CPUs.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from typing import Callable

from asyncserve.errors import InvalidParameterError, QueueFullError
from asyncserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger("asyncserve")

SMALL_BYTES = 4096
MAX_ABANDONED = 2


class CompileTimeoutError(InvalidParameterError):
    """The constraint took longer than the compile deadline: a 400 naming the field."""


class _Job:
    __slots__ = ("params", "key", "lane", "waiters", "started", "abandoned")

    def __init__(self, params: StructuredOutputsParams, lane: "_Lane"):
        self.params, self.key, self.lane = params, params.key(), lane
        self.waiters: list[asyncio.Future] = []
        self.started = self.abandoned = False


class _Lane:
    __slots__ = ("name", "queue", "running")

    def __init__(self, name: str):
        self.name = name
        self.queue: deque[_Job] = deque()
        self.running: _Job | None = None


class CompileLanes:
    """Runs `compile(params) -> grammar` (blocking) in threads for callers on one event loop; a finished
    compile is handed to `on_done(params, grammar)` (on the loop) if someone still waits for it."""

    def __init__(self, compile: Callable[[StructuredOutputsParams], object],
                 on_done: Callable[[StructuredOutputsParams, object], None]):
        self._compile, self._on_done = compile, on_done
        self._lanes = (_Lane("small"), _Lane("large"))
        self._jobs: dict[tuple, _Job] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.num_abandoned_running = 0

    async def compile(self, params: StructuredOutputsParams, timeout: float):
        """The compiled grammar; InvalidParameterError (bad constraint), CompileTimeoutError (it compiled
        past `timeout` seconds), QueueFullError (it could not start within `timeout`, or the lanes are
        busy with abandoned compiles)."""
        self._loop = asyncio.get_running_loop()
        job = self._jobs.get(params.key())
        if job is None:
            if self.num_abandoned_running >= MAX_ABANDONED:
                raise QueueFullError(f"The grammar compiler is busy with {self.num_abandoned_running} compiles "
                                     "that outlived their requests; try again later.")
            lane = self._lanes[0 if params.size() <= SMALL_BYTES else 1]
            job = _Job(params, lane)
            self._jobs[job.key] = job
            lane.queue.append(job)
            self._start_next(lane)
        waiter = self._loop.create_future()
        job.waiters.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except asyncio.TimeoutError:
            if job.started:
                raise CompileTimeoutError(f"The {params.kind} constraint did not compile within {timeout:g} s "
                                          "(--structured-outputs-compile-timeout): simplify it.",
                                          "structured_outputs") from None
            raise QueueFullError(f"The grammar compiler was busy for {timeout:g} s; try again later.") from None
        finally:
            if not waiter.done():
                waiter.cancel()
            job.waiters.remove(waiter)
            if not job.waiters and self._jobs.get(job.key) is job:
                self._abandon(job)

    def _abandon(self, job: _Job) -> None:
        del self._jobs[job.key]
        job.abandoned = True
        lane = job.lane
        if not job.started:
            lane.queue.remove(job)
            return
        logger.warning("a %s grammar compile outlived its requests: it finishes in the background and its "
                       "result is dropped", job.params.kind)
        self.num_abandoned_running += 1
        lane.running = None
        self._start_next(lane)

    def _start_next(self, lane: _Lane) -> None:
        if lane.running is not None or not lane.queue:
            return
        job = lane.running = lane.queue.popleft()
        job.started = True
        # Not a daemon, as executor threads: exit waits for it (a C++ compile cut off at exit aborts).
        threading.Thread(target=self._run, args=(job,), name=f"asyncserve-grammar_{lane.name}").start()

    def _run(self, job: _Job) -> None:
        try:
            result, error = self._compile(job.params), None
        except BaseException as exc:  # handed to the waiters on the loop
            result, error = None, exc
        try:
            self._loop.call_soon_threadsafe(self._finished, job, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    def _finished(self, job: _Job, result, error: BaseException | None) -> None:
        if job.abandoned:
            self.num_abandoned_running -= 1
            return
        del self._jobs[job.key]
        job.lane.running = None
        self._start_next(job.lane)
        if error is None:
            self._on_done(job.params, result)
        for waiter in job.waiters:
            if not waiter.done():
                if error is None:
                    waiter.set_result(result)
                else:
                    waiter.set_exception(error)
