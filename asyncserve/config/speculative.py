"""`--speculative-config`: vLLM's JSON (current `method` spelling, the older `"model": "[ngram]"`, and a
`model` alone meaning a draft model), checked once into a `SpeculativeConfig`. Standard library only: the CLI
reads it before torch loads."""
from __future__ import annotations

import json
from dataclasses import dataclass

from asyncserve.errors import ConfigError

SUPPORTED_METHODS = ("ngram", "draft_model", "eagle3")
_NEEDS_MODEL = ("draft_model", "eagle3")
# vLLM's other methods: known names, refused with a line saying what runs instead.
_NOT_BUILT_METHODS = ("eagle", "medusa", "mlp_speculator", "deepseek_mtp", "mtp",
                      "suffix", "ernie_mtp", "qwen3_next_mtp")
_OLD_NGRAM_MODEL = "[ngram]"
# Speculation pays while decode is bound by reading the weights and the drafts come true: at larger
# batches the verify step's extra tokens cost compute that rejected drafts waste, and the engine gives up
# overlapping host work with the device for the steps it speculates. Where that makes it a loss is
# measured while serving (engine/spec_decode/governor.py), so by default no batch size is fixed.
DEFAULT_DISABLE_BY_BATCH_SIZE = None
DEFAULT_DISABLE_WHEN_SLOWER = True

_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "disable_by_batch_size", "draft_tensor_parallel_size", "disable_when_slower")
_NGRAM_ONLY_KEYS = ("prompt_lookup_max", "prompt_lookup_min")
# vLLM's older flag names, accepted inside the JSON as the keys they became.
_ALIASES = {"ngram_prompt_lookup_max": "prompt_lookup_max", "ngram_prompt_lookup_min": "prompt_lookup_min",
            "speculative_disable_by_batch_size": "disable_by_batch_size",
            "speculative_model": "model"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Up to `num_speculative_tokens` drafts per sequence and step. "ngram" (prompt lookup) copies what
    followed the latest earlier occurrence of the sequence's last n tokens, n from `prompt_lookup_max` down
    to `prompt_lookup_min`; "draft_model" has the smaller causal LM `model` (a folder or hub id, the
    target's vocabulary) propose them greedily; "eagle3" the EAGLE-3 head `model` (the public checkpoint
    layout) over the target's hidden states. Steps with more than `disable_by_batch_size` running
    sequences do not speculate; with `disable_when_slower` (ours, on by default) nor do steps at a batch size
    where speculation measured slower than plain decoding."""

    num_speculative_tokens: int
    prompt_lookup_max: int = 0  # ngram only
    prompt_lookup_min: int = 0  # ngram only
    disable_by_batch_size: int | None = DEFAULT_DISABLE_BY_BATCH_SIZE  # None: no fixed limit
    method: str = "ngram"
    model: str | None = None  # draft_model, eagle3: the draft checkpoint, as the user named it
    disable_when_slower: bool = True


def _positive_int(raw: dict, key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"speculative_config: {key} must be a positive integer, got {value!r}.")
    return value


def _method(raw: dict) -> str:
    method, model = raw.get("method"), raw.get("model")
    if method is None:
        if model == _OLD_NGRAM_MODEL:
            return "ngram"
        if model is None:
            raise ConfigError('speculative_config needs a method: e.g. {"method": "ngram", '
                              '"num_speculative_tokens": 4} (or vLLM\'s older {"model": "[ngram]", ...}).')
        method = "draft_model"  # vLLM's older spelling: a model alone means a draft model
    if method == _OLD_NGRAM_MODEL:
        method = "ngram"
    if method in _NEEDS_MODEL:
        if not isinstance(model, str) or not model or model == _OLD_NGRAM_MODEL:
            raise ConfigError(f"speculative_config: method {method!r} needs the draft model's folder or hub id, "
                              f'e.g. {{"method": "{method}", "model": "Qwen/Qwen3-0.6B", '
                              f'"num_speculative_tokens": 4}}; got model={model!r}.')
        return method
    if method in SUPPORTED_METHODS:
        if model not in (None, _OLD_NGRAM_MODEL):
            raise ConfigError(f"speculative_config: method {method!r} takes no model, got model={model!r}.")
        return method
    supported = ", ".join(repr(m) for m in SUPPORTED_METHODS)
    if method in _NOT_BUILT_METHODS:
        raise ConfigError(f"speculative_config: method {method!r} is not built in asyncserve yet; supported: "
                          f'{supported} (e.g. {{"method": "ngram", "num_speculative_tokens": 4}}).')
    raise ConfigError(f"speculative_config: unknown method {method!r}; supported: {supported}.")


def parse_speculative_config(value: dict | str | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """A dict or JSON text in vLLM's spelling -> SpeculativeConfig; None stays None (no speculation)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"speculative_config is not valid JSON ({exc.msg} at column {exc.colno}): "
                              f"{value!r}; e.g. '{{\"method\": \"ngram\", \"num_speculative_tokens\": 4}}'.") from None
    if not isinstance(value, dict):
        raise ConfigError(f"speculative_config must be a JSON object, got {type(value).__name__}.")
    raw = {}
    for key, item in value.items():
        canonical = _ALIASES.get(key, key)
        if canonical not in _KEYS:
            raise ConfigError(f"speculative_config: unknown key {key!r}; asyncserve reads {list(_KEYS)}.")
        if canonical in raw:
            raise ConfigError(f"speculative_config: {canonical!r} is given twice (once as {key!r}).")
        raw[canonical] = item
    method = _method(raw)
    draft_tp = raw.get("draft_tensor_parallel_size")
    if draft_tp is not None and (method not in _NEEDS_MODEL or draft_tp != 1 or isinstance(draft_tp, bool)):
        raise ConfigError(f"speculative_config: draft_tensor_parallel_size={draft_tp!r} is not built in "
                          "asyncserve: the draft model runs unsharded beside the target (give 1, or leave it "
                          "out)" + ("" if method in _NEEDS_MODEL else f"; method {method!r} has no draft model")
                          + ".")
    num_tokens = _positive_int(raw, "num_speculative_tokens")
    if num_tokens is None:
        raise ConfigError("speculative_config needs num_speculative_tokens (how many tokens to propose per "
                          'step), e.g. {"method": "ngram", "num_speculative_tokens": 4}.')
    disable = _positive_int(raw, "disable_by_batch_size")
    disable = disable if disable is not None else DEFAULT_DISABLE_BY_BATCH_SIZE
    when_slower = raw.get("disable_when_slower", DEFAULT_DISABLE_WHEN_SLOWER)
    if not isinstance(when_slower, bool):
        raise ConfigError(f"speculative_config: disable_when_slower must be true or false, got {when_slower!r}.")
    if method in _NEEDS_MODEL:
        for key in _NGRAM_ONLY_KEYS:
            if key in raw:
                raise ConfigError(f"speculative_config: {key} applies to method 'ngram' only; method "
                                  f"{method!r} proposes from its own forward passes (leave it out).")
        return SpeculativeConfig(num_speculative_tokens=num_tokens, method=method, model=raw["model"],
                                 disable_by_batch_size=disable, disable_when_slower=when_slower)
    lookup_max, lookup_min = _positive_int(raw, "prompt_lookup_max"), _positive_int(raw, "prompt_lookup_min")
    if lookup_max is None and lookup_min is None:
        lookup_max = lookup_min = 5  # vLLM's defaults
    lookup_max = lookup_max if lookup_max is not None else lookup_min
    lookup_min = lookup_min if lookup_min is not None else lookup_max
    if lookup_min > lookup_max:
        raise ConfigError(f"speculative_config: prompt_lookup_min ({lookup_min}) is larger than "
                          f"prompt_lookup_max ({lookup_max}).")
    return SpeculativeConfig(num_speculative_tokens=num_tokens, prompt_lookup_max=lookup_max,
                             prompt_lookup_min=lookup_min, method=method, disable_by_batch_size=disable,
                             disable_when_slower=when_slower)
