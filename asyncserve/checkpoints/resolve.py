"""A model name becomes a local checkpoint directory: a folder as it is, a hub id through the Hugging Face
hub; a path that does not exist fails in one line."""
from __future__ import annotations

import os

from asyncserve.errors import ConfigError


def looks_like_path(model: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else that names the file system is meant as a path."""
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        return True
    head = model.split("/", 1)[0]
    return "/" in model and os.path.exists(head)


def check_local_path(model: str) -> None:
    """A path that does not exist fails in one line here, instead of as a hub id validation error later."""
    if looks_like_path(model) and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(f"Model path {model!r} does not exist.")


def resolve_checkpoint(model: str, revision: str | None = None) -> str:
    """A local directory is used as is; anything else is treated as a Hugging Face hub id."""
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.expanduser(model)
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "*.tiktoken"])
    except Exception as exc:  # no network, unknown id, gated repo ...
        raise ConfigError(f"Could not find model {model!r}: it is not a local directory and the "
                          f"Hugging Face hub download failed ({type(exc).__name__}: {exc}). Pass the "
                          "path of a checkpoint directory (config.json + *.safetensors).") from exc
