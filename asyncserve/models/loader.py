"""Builds a model from a Hugging Face checkpoint directory (or random weights for benchmarks): the one
loop that puts every family's checkpoint tensors in place, each through its parameter's weight_loader."""
from __future__ import annotations

import glob
import json
import os
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from asyncserve.config.tree import Config
from asyncserve.errors import ConfigError
from asyncserve.layers.linear import LinearBase, default_weight_loader
from asyncserve.layers.moe import FusedMoE, expert_param_name
from asyncserve.layers.quantization import QuantizationConfig, get_quantization_config
from asyncserve.models.base import CausalLM
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
    # Norm layers keep the values they are built with: the identity (ones and zero bias, or zeros where
    # a norm scales by 1 + w), whatever their checkpoint names (norm, ln_1, ln_f, layer_norm...).
    norm_params = {id(param) for module in model.modules() if getattr(module, "is_norm", False)
                   for param in module.parameters(recurse=False)}
    for name, param in model.named_parameters():
        if getattr(param, "checkpoint_optional", False) or id(param) in norm_params:
            continue  # KV-cache scales and norms: their defaults stand
        if name.endswith("g_idx"):  # act-order groups: all in order (no permutation)
            param.data.zero_()
        elif not param.dtype.is_floating_point:  # packed integer weights: random bits
            param.data.random_(0, 2 ** 31 - 1, generator=generator)
        elif param.dtype.itemsize == 1:  # fp8 weights: drawn in float32, then cast
            param.data.copy_(torch.empty(param.shape, device=device).uniform_(-1.0, 1.0, generator=generator))
        else:  # drawn on the device: seconds for 8B parameters, not minutes
            param.data.uniform_(-0.02, 0.02, generator=generator)


def _module_leaf(param_name: str) -> str:
    """'layers.0.self_attn.qkv_proj.weight' -> 'qkv_proj'."""
    return param_name.rpartition(".")[0].rpartition(".")[2]


def _packed_shards(model: CausalLM) -> dict[str, tuple[str, str]]:
    """checkpoint module name -> (our fused module name, shard_id)."""
    return {shard: (fused, shard) for fused, shards in model.packed_modules_mapping.items() for shard in shards}


def _expert_shard(model: CausalLM, parts: list[str]) -> tuple[list[str], tuple[str, int]] | None:
    """'...experts.3.w1.weight' -> ('...experts.w13_weight' parts, ('gate', 3)) through the family's
    `expert_modules_mapping` (any tensor of the projection: '.qweight' -> w13_qweight, '.bias' -> w13_bias);
    None for any other name."""
    for i in range(len(parts) - 3):
        shard = model.expert_modules_mapping.get(parts[i + 2])
        if parts[i] == "experts" and parts[i + 1].isdigit() and shard and i + 4 == len(parts):
            return parts[:i + 1] + [expert_param_name(shard, parts[i + 3])], (shard, int(parts[i + 1]))
    return None


def _shard_list(shards: set) -> str:
    names = sorted(map(str, shards))
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


@torch.no_grad()
def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Puts each checkpoint tensor where the model's name mapping says, through the parameter's
    `weight_loader`; raises ConfigError if a tensor has no place or a parameter (or shard) stays empty."""
    params = dict(model.named_parameters())
    packed = _packed_shards(model)
    # parameter -> the shard ids it needs filled ({None}: one whole tensor); optional ones keep their default
    expected = {name: set(getattr(param, "shard_ids", None)
                          or model.packed_modules_mapping.get(_module_leaf(name), (None,)))
                for name, param in params.items() if not getattr(param, "checkpoint_optional", False)}
    loaded: dict[str, set] = {name: set() for name in params}
    for checkpoint_name, tensor in model.checkpoint_tensors(weights):
        name = model.checkpoint_name(checkpoint_name)
        if name is None:
            continue
        parts = name.split(".")
        shard_id = None
        expert = _expert_shard(model, parts) if model.expert_modules_mapping else None
        if expert is not None:
            parts, shard_id = expert
        else:
            for i, part in enumerate(parts[:-1]):
                if part in packed:
                    parts[i], shard_id = packed[part]
                    break
        name = ".".join(parts)
        param = params.get(name)
        if param is None:
            module = name.rpartition(".")[0]
            holds = sorted(p.rpartition(".")[2] for p in params if p.rpartition(".")[0] == module)
            raise ConfigError(f"tensor {checkpoint_name!r} has no place in {type(model).__name__}"
                              + (f" (its layer holds {', '.join(holds)}: do the checkpoint's tensors match "
                                 "its quantization config?)" if holds else ""))
        weight_loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                weight_loader(param, tensor)
            else:
                weight_loader(param, tensor, shard_id)
        except ValueError as error:
            raise ConfigError(f"tensor {checkpoint_name!r} does not fit {name}: {error}") from None
        loaded[name].add(shard_id)
    missing = [name if shards == {None} else f"{name} ({_shard_list(shards - loaded[name])})"
               for name, shards in expected.items() if shards - loaded[name]]
    if missing:
        raise ConfigError(f"no weights for: {', '.join(missing[:8])}"
                          + (" ..." if len(missing) > 8 else ""))


def _process_weights_after_loading(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quant_method.process_weights_after_loading(module)
        elif isinstance(module, FusedMoE):
            module.process_weights_after_loading()


# Older layouts keep the quantization config beside config.json: file -> the method it implies.
QUANTIZE_CONFIG_FILES = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def checkpoint_quantization_config(hf_config, path: str | None = None) -> dict | None:
    """config.json's `quantization_config`, else GPTQ's quantize_config.json / AutoAWQ's quant_config.json."""
    checkpoint_config = getattr(hf_config, "quantization_config", None)
    if checkpoint_config is not None:
        return checkpoint_config if isinstance(checkpoint_config, dict) else checkpoint_config.to_dict()
    for name, method in QUANTIZE_CONFIG_FILES.items():
        file = os.path.join(path, name) if path else None
        if file and os.path.exists(file):
            with open(file) as f:
                config = json.load(f)
            config.setdefault("quant_method", method)
            return config
    return None


def quantization_config(hf_config, quantization: str | None = None, path: str | None = None) -> QuantizationConfig:
    """From `--quantization` and the checkpoint's quantization config: a quantized checkpoint is never
    read as plain weights."""
    return get_quantization_config(quantization, checkpoint_quantization_config(hf_config, path))


def build_model(config: Config, device: torch.device | str | None = None) -> CausalLM:
    """The model `config` describes, its parameters not loaded (on the meta device: shapes alone)."""
    model_config = config.model
    cls = model_class(model_config.hf_config)
    with _default_dtype(model_config.dtype), torch.device(device or model_config.device):
        return cls(model_config.hf_config, config.quantization)


def load_model(config: Config) -> CausalLM:
    """`config` is the engine's config tree: its model part says what to build, where and from what;
    its quantization part which linear method every layer uses."""
    model_config = config.model
    path, load_format, seed = model_config.path, model_config.load_format, model_config.seed
    model = build_model(config)
    if model_config.is_pooling:
        model.drop_lm_head()
    if load_format == "dummy":
        _init_dummy(model, seed)
    else:
        try:
            load_weights(model, iterate_weights(path))
        except ConfigError as error:
            raise ConfigError(f"Checkpoint {path!r}: {error}") from None
    _process_weights_after_loading(model)
    return model.eval()
