"""What the engine learns from the checkpoint: architecture config, dtype, context length, stop ids."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoTokenizer

from asyncserve.config import EngineConfig, resolve_device, resolve_dtype
from asyncserve.errors import ConfigError

logger = logging.getLogger("asyncserve")


@dataclass
class ModelConfig:
    path: str
    hf_config: object
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]


def _generation_eos_ids(path: str) -> list[int]:
    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return []
    with open(file) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _checkpoint_dtype(hf_config) -> torch.dtype | None:
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def _max_model_len(config: EngineConfig, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    sliding = getattr(hf_config, "sliding_window", None)
    if sliding and getattr(hf_config, "use_sliding_window", True) and sliding < limit:
        limit = sliding  # sliding-window attention is not built: stay inside the window
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ConfigError(f"max_model_len={config.max_model_len} is larger than the model supports "
                          f"({limit}, from config.json); lower it.")
    return config.max_model_len


def load_model_config(config: EngineConfig, path: str) -> ModelConfig:
    hf_config = AutoConfig.from_pretrained(path)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, _checkpoint_dtype(hf_config), device)
    eos = _generation_eos_ids(path)
    config_eos = getattr(hf_config, "eos_token_id", None)
    if config_eos is not None:
        eos += [config_eos] if isinstance(config_eos, int) else list(config_eos)
    return ModelConfig(path=path, hf_config=hf_config, dtype=dtype, device=device,
                       max_model_len=_max_model_len(config, hf_config),
                       vocab_size=hf_config.vocab_size, eos_token_ids=sorted(set(eos)))


def load_tokenizer(config: EngineConfig, path: str):
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or path)
    return tokenizer
