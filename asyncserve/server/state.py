"""What the handlers of one app share: the engine, served names, chat template, metrics, in-flight work."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from asyncserve.server.errors import ApiError
from asyncserve.server.lag import LagMonitor
from asyncserve.server.logprobs import LogprobFormatter
from asyncserve.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from asyncserve.engine.async_engine import AsyncEngine

logger = logging.getLogger("asyncserve.server")


@dataclass
class ServerState:
    engine: AsyncEngine
    model_names: list[str]
    chat_template: str | None = None
    api_key: str | None = None
    log_requests: bool = True
    drain_timeout: float = 5.0
    max_body_bytes: int = 4 * 1024 * 1024
    freeze_gc: bool = True
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    lag: LagMonitor = field(default_factory=LagMonitor)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    active: set = field(default_factory=set)  # Generations in flight
    _idle: asyncio.Event | None = None

    def __post_init__(self) -> None:
        self.logprobs = LogprobFormatter(self.engine.tokenizer)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def resolve_model(self, name: str | None) -> str:
        """The served name a request asked for; the first served name when it named none."""
        if name is None:
            return self.model_names[0]
        if name in self.model_names:
            return name
        raise ApiError(404, f"The model '{name}' does not exist. This server serves: "
                       f"{', '.join(self.model_names)}.", param="model", code="model_not_found")

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    def check_accepting(self) -> None:
        if self.draining:
            raise ApiError(503, "The server is shutting down; try another replica.", code="shutting_down")
        self.engine.check_health()

    # ---- in-flight work, for a graceful shutdown ------------------------------------------------

    def track(self, generation) -> None:
        self.active.add(generation)

    def untrack(self, generation) -> None:
        self.active.discard(generation)
        if not self.active and self._idle is not None:
            self._idle.set()

    async def drain(self) -> None:
        """Stops taking work; lets in-flight requests finish for drain_timeout, then aborts the rest."""
        self.draining = True
        if self.active:
            self._idle = asyncio.Event()
            logger.info("shutting down: waiting up to %.0f s for %d in-flight requests",
                        self.drain_timeout, len(self.active))
            try:
                await asyncio.wait_for(self._idle.wait(), self.drain_timeout)
            except asyncio.TimeoutError:
                logger.info("shutting down: aborting %d requests still in flight", len(self.active))
        for generation in list(self.active):
            generation.abort()  # each stream ends with finish_reason "abort"


SERVER_STATE = web.AppKey("asyncserve_server_state", ServerState)
