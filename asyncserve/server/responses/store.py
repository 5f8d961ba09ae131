"""Responses kept in memory: stored ones (`store`, the default) for GET and `previous_response_id`, the
least recently used dropped past a bound; and the ones still running, so that they can be cancelled.

Bounded by count: `ASYNCSERVE_RESPONSES_STORE_SIZE` (default 1024) responses, each with its whole
conversation. Nothing survives a restart.
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from asyncserve.errors import ConfigError

DEFAULT_CAPACITY = 1024


@dataclass
class StoredResponse:
    body: dict                # the Response object
    conversation: list[dict]  # every input item before its output: earlier turns' and its own

    def history(self) -> list[dict]:
        """What a request continuing this response replays before its own input."""
        return self.conversation + self.body["output"]


@dataclass
class Running:
    """A response being generated: its run (the cancel flag), its engine requests, its snapshot so far."""

    run: object               # ResponseRun
    generation: object        # Generation
    store: bool
    output: list[dict] = field(default_factory=list)  # the streamed items so far (none for a whole response)
    final_body: dict | None = None
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def capacity_from_env() -> int:
    value = os.environ.get("ASYNCSERVE_RESPONSES_STORE_SIZE", str(DEFAULT_CAPACITY))
    if not value.isdigit():
        raise ConfigError(f"ASYNCSERVE_RESPONSES_STORE_SIZE must be a whole number of responses, got {value!r}.")
    return int(value)


class ResponseStore:
    """Lookups come from the worker thread that prepares requests as well as from the loop: a lock guards
    the LRU order."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = capacity
        self._stored: OrderedDict[str, StoredResponse] = OrderedDict()
        self._running: dict[str, Running] = {}
        self._lock = threading.Lock()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        with self._lock:
            self._stored[response_id] = stored
            self._stored.move_to_end(response_id)
            while len(self._stored) > self.capacity:
                self._stored.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        with self._lock:
            stored = self._stored.get(response_id)
            if stored is not None:
                self._stored.move_to_end(response_id)
            return stored

    def delete(self, response_id: str) -> bool:
        with self._lock:
            return self._stored.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._stored)

    # ---- running responses (touched on the loop only) ----------------------------------------------------

    def start(self, running: Running) -> None:
        self._running[running.run.id] = running

    def end(self, response_id: str) -> None:
        running = self._running.pop(response_id, None)
        if running is not None:
            running.finished.set()

    def running(self, response_id: str) -> Running | None:
        return self._running.get(response_id)

    def running_ids(self) -> list[str]:
        return list(self._running)
