"""What the checkpoint says about the model: architecture config, dtype, context length, stop ids."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch

from asyncserve.errors import ConfigError
from asyncserve.config.pooling import PoolerConfig, resolve_pooler, resolve_runner

logger = logging.getLogger("asyncserve")


@dataclass
class ModelConfig:
    path: str                       # the local checkpoint directory
    hf_config: object
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    model: str | None = None        # as the user named it (None: the built-in model)
    served_model_names: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False
    load_format: str = "auto"
    seed: int = 0
    max_logprobs: int = 20
    enforce_eager: bool = False
    max_cudagraph_capture_size: int | None = None  # None: the runner's default (runner/mixed_graphs.py)
    generation_config: str = "auto"  # where sampling defaults come from: "auto", "vllm" or a folder
    runner_type: str = "generate"   # or "pooling": an embedding model (pooling_config.py)
    pooler: PoolerConfig | None = None  # set when runner_type is "pooling"
    # Matryoshka embeddings (config.json's is_matryoshka / matryoshka_dimensions): which `dimensions`
    # a request may ask for; None: none (any 1..hidden_size when is_matryoshka without a list).
    is_matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None
    # Images (config/multimodal.py): the most a prompt may carry, where file:// URLs may point, and the
    # hosts http(s) URLs may name (None: any).
    limit_mm_per_prompt: dict = field(default_factory=lambda: {"image": 16})
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None

    @property
    def is_pooling(self) -> bool:
        return self.runner_type == "pooling"

    @property
    def hidden_size(self) -> int:
        return self.hf_config.hidden_size


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


def _capture_size(requested: int | None) -> int | None:
    if requested is not None and requested < 0:
        raise ConfigError(f"max_cudagraph_capture_size={requested}: give a number of tokens >= 0 "
                          "(0: mixed steps run eagerly)")
    return requested


def _max_model_len(requested: int | None, hf_config) -> int:
    limit = getattr(hf_config, "max_position_embeddings", None) or 2048
    seq_length = getattr(hf_config, "seq_length", None)  # Qwen-1's training length (see qwen_config.py)
    if seq_length and seq_length < limit:
        limit = seq_length
    if requested is None:
        return limit
    if requested > limit:
        raise ConfigError(f"max_model_len={requested} is larger than the model supports "
                          f"({limit}, from config.json); lower it.")
    return requested


def load_model_config(args, path: str) -> ModelConfig:
    """`args` is the user's EngineConfig; the result is what every layer below reads."""
    from asyncserve.checkpoints.hf_config import load_hf_config
    from asyncserve.config.device import resolve_device, resolve_dtype
    hf_config = load_hf_config(path)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, _checkpoint_dtype(hf_config), device)
    eos = _generation_eos_ids(path)
    config_eos = getattr(hf_config, "eos_token_id", None)
    if config_eos is not None:
        eos += [config_eos] if isinstance(config_eos, int) else list(config_eos)
    runner_type = resolve_runner(args.runner, args.convert, args.task,
                                 list(getattr(hf_config, "architectures", None) or []), path)
    pooler = resolve_pooler(args.pooler_config, path) if runner_type == "pooling" else None
    matryoshka = getattr(hf_config, "matryoshka_dimensions", None)
    return ModelConfig(path=path, hf_config=hf_config, dtype=dtype, device=device,
                       max_model_len=_max_model_len(args.max_model_len, hf_config),
                       vocab_size=hf_config.vocab_size, eos_token_ids=sorted(set(eos)),
                       model=args.model, served_model_names=args.model_names, tokenizer=args.tokenizer,
                       skip_tokenizer_init=args.skip_tokenizer_init, load_format=args.load_format,
                       seed=args.seed, max_logprobs=args.max_logprobs, enforce_eager=args.enforce_eager,
                       max_cudagraph_capture_size=_capture_size(args.max_cudagraph_capture_size),
                       generation_config=args.generation_config, runner_type=runner_type, pooler=pooler,
                       is_matryoshka=bool(getattr(hf_config, "is_matryoshka", False) or matryoshka),
                       matryoshka_dimensions=list(matryoshka) if matryoshka else None,
                       limit_mm_per_prompt=dict(args.limit_mm_per_prompt),
                       allowed_local_media_path=args.allowed_local_media_path,
                       allowed_media_domains=args.allowed_media_domains)
