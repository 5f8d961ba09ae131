"""Variants of the tiny checkpoints for tests: another config.json, other weights, same tokenizer."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file


def copy_checkpoint(source: str, target, config_updates: dict | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> str:
    """Copies `source` to `target` with config.json updated; `weights` replace every safetensors file."""
    target = os.fspath(target)
    shutil.copytree(source, target)
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    config.update(config_updates or {})
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    if weights is not None:
        for name in os.listdir(target):
            if name.endswith(".safetensors") or name == "model.safetensors.index.json":
                os.remove(os.path.join(target, name))
        save_file({name: tensor.contiguous() for name, tensor in weights.items()},
                  os.path.join(target, "model.safetensors"))
    return target
