"""`--generation-config`: the model creator's sampling defaults (generation_config.json), as vLLM applies them.

They stand in for the sampling fields a request leaves out; what a request sets always wins.
"""
from __future__ import annotations

import json
import logging
import os

from asyncserve.errors import ConfigError, SamplingParamsError
from asyncserve.sampling_params import SamplingParams

logger = logging.getLogger("asyncserve")

_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")
_FILE = "generation_config.json"


def sampling_defaults(generation_config: str, model_path: str) -> dict:
    """{SamplingParams field: value}: 'vllm' gives none, 'auto' the model's file, else a folder or file."""
    if generation_config == "vllm":
        return {}
    source = model_path if generation_config == "auto" else generation_config
    file = source if os.path.isfile(source) else os.path.join(source, _FILE)
    if not os.path.isfile(file):
        if generation_config == "auto":
            return {}
        raise ConfigError(f"--generation-config {generation_config!r}: there is no {_FILE} there.")
    try:
        with open(file, encoding="utf-8") as f:
            values = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"Cannot read {file}: {exc}.") from None
    defaults = {key: values[key] for key in _KEYS if values.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    try:
        SamplingParams(**defaults)
    except SamplingParamsError as exc:  # refused at start-up rather than as a 400 on every request
        raise ConfigError(f"{file}: {exc}") from None
    return defaults


def log_sampling_defaults(defaults: dict, generation_config: str) -> None:
    if defaults:
        source = f"the model's {_FILE}" if generation_config == "auto" else generation_config
        logger.info("default sampling parameters from %s: %s; requests that leave these out get them "
                    "(--generation-config vllm turns this off)",
                    source, ", ".join(f"{key}={value}" for key, value in defaults.items()))
