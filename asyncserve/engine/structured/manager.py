"""The engine's side of structured outputs: grammars compiled once per constraint (cached by its key),
one matcher per constrained sequence, and each step's bitmask filled for its constrained rows only.

Compiling may take long for a big schema: callers on an event loop run `compile` in a thread first
(AsyncEngine does); the engine then finds it in the cache.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch

from asyncserve.engine.structured.backend import GrammarBackend, GrammarMatcher, make_backend
from asyncserve.errors import InvalidParameterError
from asyncserve.sampling_params import StructuredOutputsParams

logger = logging.getLogger("asyncserve")


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], backend: str = "xgrammar",
                 pin_memory: bool = False, cache_size: int = 512):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.backend_name = backend
        self.pin_memory = pin_memory
        self.cache_size = cache_size
        self._backend: GrammarBackend | None = None
        self._cache: OrderedDict[tuple, object] = OrderedDict()
        self._lock = threading.Lock()
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

    def compile(self, params: StructuredOutputsParams):
        """The compiled grammar of `params`: from the cache, else compiled (InvalidParameterError if bad)."""
        key = params.key()
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                return grammar
        grammar = self.backend.compile(params)
        with self._lock:
            self.num_compiles += 1
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar

    def new_matcher(self, grammar) -> GrammarMatcher:
        return self.backend.new_matcher(grammar)

    def bitmask(self, matchers: list[GrammarMatcher]) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32 on the host (pinned on a GPU engine): row i is matcher i's."""
        rows = len(matchers)
        width = -(-self.vocab_size // 32)
        if self._bitmask is None or self._bitmask.shape[0] < rows:
            # Reused: the step that read the last one has finished sampling before the next is filled.
            self._bitmask = torch.empty(max(rows, 64), width, dtype=torch.int32, pin_memory=self.pin_memory)
        bitmask = self._bitmask[:rows]
        self.backend.fill_bitmask(matchers, bitmask, list(range(rows)))
        return bitmask
