"""What the handlers of one app share: the engine, served names, chat template, metrics, in-flight work."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TYPE_CHECKING

from aiohttp import web

from asyncserve.server.errors import ApiError
from asyncserve.server.lag import LagMonitor
from asyncserve.server.logprobs import LogprobFormatter
from asyncserve.server.metrics import ServerMetrics
from asyncserve.server.prompt_encoder import PromptEncoder
from asyncserve.utils.ids import random_hex_id

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
    stream_write_timeout: float = 30.0  # a client that reads nothing this long is cut off, its request aborted
    request_body_timeout: float = 60.0  # a body not received within this is answered 408
    tool_call_parser: str | None = None  # --tool-call-parser: how tool calls look in the model's text
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice: tool_choice "auto" is served
    reasoning_parser: str | None = None  # --reasoning-parser: thinking text apart from the answer
    lora: Any = None  # LoRAAdapters (server/lora_adapters.py): adapters served by name; None without LoRA
    health_stall_timeout: float = 120.0  # /health turns 503 after this long with work and no finished step
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>" unless a request says
    metrics: ServerMetrics = field(init=False)  # its token histograms' buckets follow max_model_len
    lag: LagMonitor = field(default_factory=LagMonitor)
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    active: set = field(default_factory=set)  # Generations in flight
    _idle: asyncio.Event | None = None
    _executor: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        self.metrics = ServerMetrics(self.engine.max_model_len)
        self.logprobs = LogprobFormatter(self.engine.tokenizer, self.return_tokens_as_token_ids)
        tokenizer = self.engine.tokenizer
        self.prompt_encoder = PromptEncoder(tokenizer, self.engine.max_model_len) if tokenizer is not None else None

    async def run(self, offload: bool, fn, *args):
        """`fn(*args)`, in the worker thread when `offload`: big inputs are parsed, rendered and tokenized
        there, so that no request holds the loop (the Rust tokenizer releases the GIL; Python code lets the
        loop in every switch interval). One worker: the tokenizer is never used by two of them at once."""
        if not offload:
            return fn(*args)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="asyncserve-prepare")
        return await asyncio.get_running_loop().run_in_executor(self._executor, _call_freeing_here, fn, args)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def resolve_model(self, name: str | None) -> str:
        """The served name a request asked for; the first served name when it named none."""
        if name is None:
            return self.model_names[0]
        if name in self.model_names or (self.lora is not None and self.lora.resolve(name) is not None):
            return name
        served = self.model_names + (list(self.lora.by_name) if self.lora is not None else [])
        raise ApiError(404, f"The model '{name}' does not exist. This server serves: "
                       f"{', '.join(served)}.", param="model", code="model_not_found")

    def lora_request(self, model: str):
        """The LoRARequest of a served adapter's name (None: the base model)."""
        return self.lora.get(model) if self.lora is not None else None

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{random_hex_id()}"

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


def _call_freeing_here(fn, args):
    """Calls fn; a failure's traceback is dropped here, so that the big objects its frames hold (a parsed
    body of millions of token ids) are freed in this thread, not on the loop that receives the error."""
    try:
        return fn(*args)
    except Exception as exc:
        exc.__traceback__ = exc.__context__ = None
        raise exc


SERVER_STATE = web.AppKey("asyncserve_server_state", ServerState)
