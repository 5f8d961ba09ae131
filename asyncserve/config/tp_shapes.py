"""What tensor parallelism asks of a model's shape: heads and the MLP split evenly over the ranks; the
parallel layers split with the same arithmetic.

Arithmetic on config.json's numbers, without torch: EngineConfig checks it as soon as it is made,
before anything is imported or loaded, and the executor again on the resolved config.
"""
from __future__ import annotations

import json
import os

from asyncserve.errors import ConfigError


def divide(total: int, parts: int, what: str) -> int:
    """`total` split evenly over `parts` ranks, or a ValueError that names `what` (checked at start-up)."""
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


def heads_per_rank(num_heads: int, size: int, what: str = "num_key_value_heads") -> int:
    """Heads split over ranks, or replicated (one per rank) when there are fewer heads than ranks."""
    if num_heads >= size:
        return divide(num_heads, size, what)
    if size % num_heads:
        raise ValueError(f"tensor_parallel_size ({size}) must be a multiple of {what} ({num_heads}) "
                         "when it exceeds it")
    return 1


def check_shapes(config: dict, size: int) -> None:
    """`config`: config.json's fields (the ones missing are not checked)."""
    heads = config.get("num_attention_heads")
    try:
        if heads:
            divide(heads, size, "num_attention_heads")
            heads_per_rank(config.get("num_key_value_heads") or heads, size)
        if config.get("intermediate_size"):
            divide(config["intermediate_size"], size, "intermediate_size")
    except ValueError as error:
        raise ConfigError(f"The model cannot be split over tensor_parallel_size={size}: {error}.") from None


def check_checkpoint_shapes(model: str | None, revision: str | None, size: int) -> None:
    """Checks a local checkpoint's config.json, or a hub id's (fetched alone: a model that cannot be split
    fails before its weights download); says nothing when there is none to read (the executor checks
    again once the checkpoint is at hand)."""
    if model is None:
        return
    path = os.path.join(os.path.expanduser(model), "config.json")
    if not os.path.isfile(path):
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(model, "config.json", revision=revision)
        except Exception:  # offline, not a hub id (a .gguf file ...), gated: the load will say what
            return
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return  # an unreadable config.json gets its own message when the model loads
    if isinstance(config, dict):
        check_shapes(config, size)
