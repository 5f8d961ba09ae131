"""`--generation-config`: the model creator's sampling defaults (generation_config.json), read as vLLM reads them.

They stand in for the sampling fields a request leaves out. Only values that differ from transformers'
own defaults count (a file that repeats `top_k: 50` sets nothing), as in vLLM.
"""
from __future__ import annotations

import logging
import os

from asyncserve.errors import ConfigError

logger = logging.getLogger("asyncserve")

_KEYS = ("repetition_penalty", "temperature", "top_k", "top_p", "min_p", "max_new_tokens")


def sampling_defaults(generation_config: str, model_path: str) -> dict:
    """{SamplingParams field: value}; 'vllm' means none, 'auto' the model's file, else a folder or file."""
    if generation_config == "vllm":
        return {}
    from transformers import GenerationConfig
    source = model_path if generation_config == "auto" else generation_config
    try:
        if os.path.isfile(source):
            config = GenerationConfig.from_json_file(source)
        else:
            config = GenerationConfig.from_pretrained(source)
    except OSError as exc:  # no generation_config.json
        if generation_config == "auto":
            return {}
        raise ConfigError(f"--generation-config {generation_config!r}: no readable generation_config.json "
                          f"there ({exc}).") from None
    diff = config.to_diff_dict()
    defaults = {key: diff[key] for key in _KEYS if diff.get(key) is not None}
    if "max_new_tokens" in defaults:
        defaults["max_tokens"] = defaults.pop("max_new_tokens")
    return defaults


def log_sampling_defaults(defaults: dict, generation_config: str) -> None:
    if defaults:
        source = "the model's generation_config.json" if generation_config == "auto" else generation_config
        logger.info("default sampling parameters from %s: %s; requests that leave these out get them "
                    "(--generation-config vllm turns this off)",
                    source, ", ".join(f"{key}={value}" for key, value in defaults.items()))
