"""Where the event loop stalls: `ASYNCSERVE_STALL_STACKS=FILE` samples the loop thread's Python stack while
the loop has not ticked for 15 ms, and every other thread's beside it, and writes the stacks counted.

The lag monitor says how late the loop woke; this says what it was doing meanwhile (its own work, or waiting
for the GIL while the step thread, a tokenizer or the garbage collector held it). Off unless the variable is
set; the file is rewritten every few seconds, so a server that is killed still leaves it.
"""
from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import traceback

STALL_STACKS_ENV = "ASYNCSERVE_STALL_STACKS"


class StallSampler:
    """A watchdog thread that knows when the loop last ticked (a 5 ms heartbeat); while it has not for
    `stall` seconds it samples the stacks every 2 ms."""

    def __init__(self, path: str, stall: float = 0.015, write_every: float = 5.0):
        self.path = path
        self.stall = stall
        self.write_every = write_every
        self.last_tick = time.perf_counter()
        self.loop_stacks: dict[str, int] = {}
        self.other_stacks: dict[str, int] = {}
        self.num_stalls = 0
        self._heartbeat: asyncio.Task | None = None
        self._stopped = threading.Event()

    @classmethod
    def from_env(cls, environ=os.environ) -> StallSampler | None:
        path = environ.get(STALL_STACKS_ENV)
        return cls(path) if path else None

    def start(self) -> None:
        """Call on the loop's thread, inside the running loop."""
        async def heartbeat() -> None:
            while True:
                self.last_tick = time.perf_counter()
                await asyncio.sleep(0.005)

        self._heartbeat = asyncio.get_running_loop().create_task(heartbeat(), name="asyncserve-stall-heartbeat")
        threading.Thread(target=self._watch, args=(threading.get_ident(),), daemon=True,
                         name="asyncserve-stall-sampler").start()

    async def stop(self) -> None:
        self._stopped.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        self.write()

    def _watch(self, loop_thread: int) -> None:
        in_stall = False
        next_write = time.perf_counter() + self.write_every
        me = threading.get_ident()
        while not self._stopped.wait(0.002):
            now = time.perf_counter()
            if now >= next_write:
                self.write()
                next_write = now + self.write_every
            if now - self.last_tick < self.stall:
                in_stall = False
                continue
            self.num_stalls += not in_stall
            in_stall = True
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = _format(frame)
                if ident == loop_thread:
                    self.loop_stacks[stack] = self.loop_stacks.get(stack, 0) + 1
                else:
                    key = f"[{names.get(ident, ident)}] {stack}"
                    self.other_stacks[key] = self.other_stacks.get(key, 0) + 1

    def write(self) -> None:
        loop_stacks, other_stacks = dict(self.loop_stacks), dict(self.other_stacks)
        with open(self.path, "w") as out:
            out.write(f"# {self.num_stalls} stalls of >= {self.stall * 1e3:.0f} ms; samples every 2 ms\n"
                      "# the loop thread's stacks, most sampled first:\n")
            out.writelines(f"{count} {stack}\n" for stack, count in sorted(loop_stacks.items(), key=lambda item: -item[1]))
            out.write("# the other threads' stacks in the same samples:\n")
            out.writelines(f"{count} {stack}\n" for stack, count in sorted(other_stacks.items(), key=lambda item: -item[1]))


def _format(frame) -> str:
    return ";".join(f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}"
                    for f in traceback.extract_stack(frame)[-12:])
