"""Builds a model from a Hugging Face checkpoint directory (or random weights for benchmarks)."""
from __future__ import annotations

import glob
import json
import os
from contextlib import contextmanager
from typing import Iterator

import torch
from safetensors import safe_open

from asyncserve.errors import ConfigError
from asyncserve.models.registry import model_class


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, shard) for shard in shards]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ConfigError(f"No *.safetensors weights in {path!r}: asyncserve loads safetensors "
                          "checkpoints (convert .bin files with transformers' save_pretrained), or "
                          "use load_format='dummy' for random weights.")
    return files


def iterate_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = safetensors_files(path)
    with _progress(files) as bar:
        for file in files:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
                    bar.update(1)


def _progress(files: list[str]):
    """A bar over the checkpoint's tensors (headers only are read to count them): loading takes minutes."""
    from tqdm.auto import tqdm
    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            total += len(f.keys())
    return tqdm(total=total, desc=f"Loading weights ({len(files)} file{'s' if len(files) > 1 else ''})",
                unit="tensor", mininterval=0.5)


def _init_dummy(model: torch.nn.Module, seed: int) -> None:
    """Small random weights: real shapes and real arithmetic, without a checkpoint."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        else:  # drawn on the device: seconds for 8B parameters, not minutes
            param.data.uniform_(-0.02, 0.02, generator=generator)


def load_model(hf_config, path: str | None, dtype: torch.dtype, device: torch.device,
               load_format: str = "auto", seed: int = 0) -> torch.nn.Module:
    cls = model_class(hf_config)
    with _default_dtype(dtype), torch.device(device):
        model = cls(hf_config)
    if load_format == "dummy":
        _init_dummy(model, seed)
    else:
        loaded = model.load_weights(iterate_weights(path))
        missing = {name for name, _ in model.named_parameters()} - loaded
        if missing:
            raise ConfigError(f"Checkpoint {path!r} lacks weights for: {', '.join(sorted(missing)[:8])}"
                              + (" ..." if len(missing) > 8 else ""))
    return model.eval()
