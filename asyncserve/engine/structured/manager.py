"""The engine's side of structured outputs: grammars compiled once per constraint (kept in a cache bounded
by bytes), one matcher per constrained sequence, and each step's bitmask filled for its constrained rows.

Callers on an event loop compile with `compile_async` first (AsyncEngine does: off the loop, under a
deadline, see compile_lanes.py) and hand the grammar over with `hand_over`; the engine's `compile` then
finds it without compiling on the loop. Offline callers just call `compile`.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from asyncserve.config import EngineConfig
from asyncserve.engine.structured.backend import GrammarBackend, GrammarMatcher
from asyncserve.engine.structured.compile_lanes import CompileLanes
from asyncserve.engine.structured.constraints import constraint_error
from asyncserve.engine.structured.factory import make_backend
from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger("asyncserve")

# --structured-outputs-cache-mb (vLLM's VLLM_XGRAMMAR_CACHE_MB has the same default), -max-bytes, -compile-timeout
DEFAULT_CACHE_MB = EngineConfig.structured_outputs_cache_mb
DEFAULT_MAX_BYTES = EngineConfig.structured_outputs_max_bytes
DEFAULT_COMPILE_TIMEOUT = EngineConfig.structured_outputs_compile_timeout


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], backend: str = "xgrammar",
                 pin_memory: bool = False, cache_mb: float = DEFAULT_CACHE_MB,
                 max_bytes: int = DEFAULT_MAX_BYTES, compile_timeout: float = DEFAULT_COMPILE_TIMEOUT):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.backend_name = backend
        self.pin_memory = pin_memory
        self.cache_bytes_limit = int(cache_mb * 1024 * 1024)
        self.max_bytes = max_bytes
        self.compile_timeout = compile_timeout
        self._backend: GrammarBackend | None = None
        self._cache: OrderedDict[tuple, tuple[object, int]] = OrderedDict()  # key -> (grammar, bytes)
        self.cache_bytes = 0
        self._handed_over: tuple[tuple, object] | None = None
        self._lock = threading.Lock()
        self._lanes = CompileLanes(self._compile_new, self._keep)
        self._bitmask: torch.Tensor | None = None  # reused host buffer, grown to the largest step
        self.num_compiles = 0

    @property
    def backend(self) -> GrammarBackend:
        """Made on first use: reading a large vocabulary into the grammar engine takes a moment."""
        with self._lock:
            if self._backend is None:
                if self.tokenizer is None:
                    raise InvalidParameterError("Structured outputs need a tokenizer; this engine runs with "
                                                "skip_tokenizer_init.", "structured_outputs")
                self._backend = make_backend(self.backend_name, self.tokenizer, self.vocab_size,
                                             self.stop_token_ids)
            return self._backend

    def check_size(self, params: StructuredOutputsParams) -> None:
        size = params.size()
        if size > self.max_bytes:
            raise constraint_error(params, f"it is {size} characters long; this server compiles constraints "
                                           f"of at most {self.max_bytes} (--structured-outputs-max-bytes).")

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of `params`: handed over, cached, or compiled here (InvalidParameterError)."""
        key = params.key()
        handed, self._handed_over = self._handed_over, None
        if handed is not None and handed[0] == key:
            return handed[1]
        grammar = self._cached(key)
        if grammar is None:
            self.check_size(params)
            grammar = self._compile_new(params)
            self._keep(params, grammar)
        return grammar

    async def compile_async(self, params: StructuredOutputsParams):
        """`compile` off the loop, within the compile deadline (see compile_lanes.py)."""
        grammar = self._cached(params.key())
        if grammar is None:
            self.check_size(params)
            grammar = await self._lanes.compile(params, self.compile_timeout)
        return grammar

    def hand_over(self, params: StructuredOutputsParams, grammar) -> None:
        """The next `compile(params)` returns `grammar`, cached or not (call it right before add_request)."""
        self._handed_over = (params.key(), grammar)

    def _cached(self, key: tuple):
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            self._cache.move_to_end(key)
            return entry[0]

    def _compile_new(self, params: StructuredOutputsParams):
        backend = self.backend
        grammar = backend.compile(params)
        if backend.matches_nothing(grammar):
            raise constraint_error(params, "no output can satisfy it: it allows no first token and cannot "
                                           "end at once (e.g. a rule that only refers to itself).")
        with self._lock:
            self.num_compiles += 1
        return grammar

    def _keep(self, params: StructuredOutputsParams, grammar) -> None:
        """Caches `grammar`, least recently used entries out past the byte bound; one bigger than the
        whole bound is not kept."""
        size = self.backend.grammar_bytes(grammar)
        if size > self.cache_bytes_limit:
            return
        key = params.key()
        with self._lock:
            old = self._cache.pop(key, None)
            if old is not None:
                self.cache_bytes -= old[1]
            self._cache[key] = (grammar, size)
            self.cache_bytes += size
            while self.cache_bytes > self.cache_bytes_limit:
                _, (_, evicted) = self._cache.popitem(last=False)
                self.cache_bytes -= evicted

    def new_matcher(self, grammar) -> GrammarMatcher:
        return self.backend.new_matcher(grammar)

    def bitmask(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32 on the host (pinned on a GPU engine): row i is matcher i's."""
        bitmask = self._rows(len(matchers))
        self.backend.fill_bitmask(matchers, bitmask, list(range(len(matchers))))
        return bitmask

    def num_valid_drafts(self, matcher: GrammarMatcher, draft_token_ids: list[int]) -> int:
        """How many of the proposed tokens, from the first, the grammar accepts after what `matcher` has
        accepted (a token after a stop token never is); the matcher ends where it began."""
        count = self.backend.accept_prefix(matcher, draft_token_ids)
        if count:
            matcher.rollback(count)
        return count

    def bitmask_through_drafts(self, matchers: list[GrammarMatcher],
                               drafts: list[list[int]]) -> torch.Tensor:
        """Speculative decoding's verify masks: matcher i owns len(drafts[i]) + 1 consecutive rows of the
        [R, ceil(V / 32)] int32 host bitmask, and its row j allows what may follow drafts[i][:j]. Rows past
        the first draft the grammar rejects, or past a stop token it accepts, allow everything: the verify
        rule never emits from them (that draft's own row masks it out, so it is rejected). Each matcher
        is advanced through its valid drafts, then rolled back one token at a time, every position's rows
        of all matchers filled in one batched call; it ends where it began."""
        starts, total = [], 0
        for tokens in drafts:
            starts.append(total)
            total += len(tokens) + 1
        bitmask = self._rows(total)
        bitmask.fill_(-1)
        backend = self.backend
        positions = [backend.accept_prefix(matcher, tokens) for matcher, tokens in zip(matchers, drafts)]
        unfilled = list(range(len(matchers)))  # matcher i's rows 0 .. positions[i] are still to fill
        while unfilled:
            filled = [i for i in unfilled if not matchers[i].is_terminated()]
            if filled:
                backend.fill_bitmask([matchers[i] for i in filled], bitmask,
                                     [starts[i] + positions[i] for i in filled])
            unfilled = [i for i in unfilled if positions[i]]
            for i in unfilled:
                matchers[i].rollback(1)
                positions[i] -= 1
        return bitmask

    def _rows(self, rows: int) -> torch.Tensor:
        width = -(-self.vocab_size // 32)
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            # Reused: the step that read the last one has finished sampling before the next is filled.
            self._bitmask = torch.empty(max(rows, 64), width, dtype=torch.int32, pin_memory=self.pin_memory)
        return self._bitmask[:rows]
