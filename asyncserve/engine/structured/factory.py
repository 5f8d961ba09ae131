"""Picks the grammar engine by name. The backends are imported only when chosen: llguidance is an optional
extra, and a server that never constrains output need not load either native library."""
from __future__ import annotations

from asyncserve.config.engine_args import STRUCTURED_OUTPUTS_BACKENDS
from asyncserve.engine.structured.backend import GrammarBackend
from asyncserve.errors import InvalidParameterError

BACKENDS = STRUCTURED_OUTPUTS_BACKENDS


def make_backend(name: str, tokenizer, vocab_size: int, stop_token_ids: list[int]) -> GrammarBackend:
    if name == "xgrammar":
        from asyncserve.engine.structured.xgrammar_backend import XGrammarBackend
        return XGrammarBackend(tokenizer, vocab_size, stop_token_ids)
    if name == "guidance":
        from asyncserve.engine.structured.guidance_backend import GuidanceBackend
        return GuidanceBackend(tokenizer, vocab_size, stop_token_ids)
    raise InvalidParameterError(f"Unknown structured-outputs backend {name!r}; choose one of {list(BACKENDS)}.",
                                "structured_outputs_backend")
