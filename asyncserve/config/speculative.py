"""`--speculative-config`: vLLM's JSON (current `method` spelling and the older `"model": "[ngram]"`),
checked once into a `SpeculativeConfig`. Standard library only: the CLI reads it before torch loads."""
from __future__ import annotations

import json
from dataclasses import dataclass

from asyncserve.errors import ConfigError

SUPPORTED_METHODS = ("ngram",)
# vLLM's other methods: known names, refused with a line saying what runs instead.
_NOT_BUILT_METHODS = ("draft_model", "eagle", "eagle3", "medusa", "mlp_speculator", "deepseek_mtp", "mtp",
                      "suffix", "ernie_mtp", "qwen3_next_mtp")
_OLD_NGRAM_MODEL = "[ngram]"
# Speculation pays while decode is bound by reading the weights: at larger batches the verify step's
# extra tokens cost compute that rejected drafts waste, and the engine also gives up overlapping
# host work with the device for the steps it speculates (it needs each step's tokens to propose).
DEFAULT_DISABLE_BY_BATCH_SIZE = 16

_KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
         "disable_by_batch_size")
# vLLM's older flag names, accepted inside the JSON as the keys they became.
_ALIASES = {"ngram_prompt_lookup_max": "prompt_lookup_max", "ngram_prompt_lookup_min": "prompt_lookup_min",
            "speculative_disable_by_batch_size": "disable_by_batch_size",
            "speculative_model": "model"}


@dataclass(frozen=True)
class SpeculativeConfig:
    """n-gram (prompt lookup) speculation: up to `num_speculative_tokens` drafts per sequence and step,
    copied from what followed the latest earlier occurrence of the sequence's last n tokens, n from
    `prompt_lookup_max` down to `prompt_lookup_min`. Steps with more than `disable_by_batch_size` running
    sequences do not speculate."""

    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    method: str = "ngram"


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
    num_tokens = _positive_int(raw, "num_speculative_tokens")
    if num_tokens is None:
        raise ConfigError("speculative_config needs num_speculative_tokens (how many tokens to propose per "
                          'step), e.g. {"method": "ngram", "num_speculative_tokens": 4}.')
    lookup_max, lookup_min = _positive_int(raw, "prompt_lookup_max"), _positive_int(raw, "prompt_lookup_min")
    if lookup_max is None and lookup_min is None:
        lookup_max = lookup_min = 5  # vLLM's defaults
    lookup_max = lookup_max if lookup_max is not None else lookup_min
    lookup_min = lookup_min if lookup_min is not None else lookup_max
    if lookup_min > lookup_max:
        raise ConfigError(f"speculative_config: prompt_lookup_min ({lookup_min}) is larger than "
                          f"prompt_lookup_max ({lookup_max}).")
    disable = _positive_int(raw, "disable_by_batch_size")
    return SpeculativeConfig(num_speculative_tokens=num_tokens, prompt_lookup_max=lookup_max,
                             prompt_lookup_min=lookup_min, method=method,
                             disable_by_batch_size=disable if disable is not None else DEFAULT_DISABLE_BY_BATCH_SIZE)
