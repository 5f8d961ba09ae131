"""A LoRA adapter as PEFT saves it (`adapter_config.json` + `adapter_model.safetensors`), read into the
shapes a model's fused projections take: per module of ours (e.g. `model.layers.0.self_attn.qkv_proj`), one
(A [r, in], B [out_slice, r]) pair per slice of its `packed_modules_mapping` (q, k, v; gate, up), None where the
adapter leaves a slice alone. The scaling is PEFT's: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
What PEFT can save but we cannot serve is refused by name, before anything reaches the GPU.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from asyncserve.errors import LoRAAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_WEIGHT_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.default)?\.weight$")


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int
    scaling: float
    target_modules: list[str]
    # our module name -> one (A, B) per slice of that module (a plain projection has one slice)
    weights: dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]] = field(default_factory=dict)

    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for slices in self.weights.values() for pair in slices if pair
                   for a, b in [pair])


def read_adapter_config(path: str) -> dict:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise LoRAAdapterError(f"{path!r} is not a PEFT LoRA adapter: it has no {CONFIG_FILE}.")
    with open(config_path) as f:
        config = json.load(f)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise LoRAAdapterError(f"The adapter at {path!r} is a {peft_type} adapter; only LoRA adapters are served.")
    refusals = [
        (config.get("modules_to_save"), "modules_to_save (fully trained copies of modules, e.g. a new LM head)"),
        (config.get("use_dora"), "use_dora (DoRA's magnitude vectors)"),
        (config.get("rank_pattern") or config.get("alpha_pattern"), "rank_pattern/alpha_pattern (per-module ranks)"),
        (config.get("bias", "none") != "none", f"bias={config.get('bias')!r} (trained biases)"),
        (config.get("fan_in_fan_out"), "fan_in_fan_out (GPT-2's transposed Conv1D layers)"),
        (config.get("layers_to_transform") is not None, "layers_to_transform"),
    ]
    for refused, what in refusals:
        if refused:
            raise LoRAAdapterError(f"The adapter at {path!r} uses {what}, which is not supported: retrain or "
                                   "merge it into the base model (peft's merge_and_unload) and serve the result.")
    return config


def adapter_scaling(config: dict) -> float:
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _load_tensors(path: str) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        file = os.path.join(path, name)
        if os.path.isfile(file):
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file
                return load_file(file)
            return torch.load(file, map_location="cpu", weights_only=True)
    raise LoRAAdapterError(f"The adapter at {path!r} has no weights ({' or '.join(WEIGHT_FILES)}).")


def load_peft_adapter(name: str, path: str, packed_modules_mapping: dict[str, tuple[str, ...]],
                      supported_modules: set[str] | None = None) -> LoRAAdapter:
    """`packed_modules_mapping`: the model's fused projections and the checkpoint names they pack (vLLM's
    attribute of that name). `supported_modules`: the short names adapters may target (default: the packed
    names and every other linear name the adapter uses except embeddings and the LM head)."""
    config = read_adapter_config(path)
    rank = int(config["r"])
    unpacked_to = {part: (packed, index) for packed, parts in packed_modules_mapping.items()
                   for index, part in enumerate(parts)}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for tensor_name, tensor in _load_tensors(path).items():
        if "lora_embedding" in tensor_name:
            raise LoRAAdapterError(f"The adapter at {path!r} adapts the embeddings or the LM head "
                                   f"({tensor_name}); only the attention and MLP projections are supported.")
        match = _WEIGHT_NAME.match(tensor_name)
        if match is None:
            raise LoRAAdapterError(f"Unexpected tensor {tensor_name!r} in the adapter at {path!r}: expected "
                                   "PEFT's '<module>.lora_A.weight' / '<module>.lora_B.weight'.")
        pairs.setdefault(match["module"], {})[match["which"]] = tensor
    weights: dict[str, list] = {}
    targets = set()
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise LoRAAdapterError(f"The adapter at {path!r} lacks lora_{missing} of {module}.")
        a, b = pair["A"], pair["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise LoRAAdapterError(f"{module} in the adapter at {path!r} has rank {a.shape[0]}/{b.shape[1]}, "
                                   f"not the config's r={rank}.")
        parent, _, short = module.rpartition(".")
        if short == "lm_head" or (supported_modules is not None and short not in supported_modules):
            supported = (", ".join(sorted(supported_modules)) if supported_modules is not None
                         else "the attention and MLP projections")
            raise LoRAAdapterError(f"The adapter at {path!r} targets {short!r}, which is not supported "
                                   f"(supported: {supported}).")
        targets.add(short)
        if short in unpacked_to:
            packed, index = unpacked_to[short]
            slices = weights.setdefault(f"{parent}.{packed}", [None] * len(packed_modules_mapping[packed]))
            slices[index] = (a, b)
        else:
            weights[module] = [(a, b)]
    return LoRAAdapter(name=name, path=path, rank=rank, scaling=adapter_scaling(config),
                       target_modules=sorted(targets), weights=weights)
