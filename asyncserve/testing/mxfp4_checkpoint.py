"""A tiny GPT-OSS checkpoint in the public checkpoints' layout (openai/gpt-oss-20b): the experts packed in
MXFP4 (`experts.gate_up_proj_blocks` / `_scales`, `down_proj_blocks` / `_scales`, [E, out, in / 32, 16]
and [E, out, in / 32]) and `quant_method: "mxfp4"` in config.json, made from the dequantized checkpoint
`build_tiny_checkpoint(path, "gpt_oss")` writes (whose experts are MXFP4 values, so packing is exact)."""
from __future__ import annotations

import json
import os
import shutil

import torch

from asyncserve.kernels.mxfp4 import FP4_E2M1_VALUES, MXFP4_GROUP

# config.json's list in the public checkpoints: what stays unquantized.
MODULES_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [..., K] -> (blocks uint8 [..., K / 32, 16], scales uint8 [..., K / 32]): each group of 32
    scaled by the power of two that brings its largest magnitude to at most 6, each value rounded to the
    nearest e2m1 code. Exact for weights that are MXFP4 values already."""
    groups = weight.float().reshape(*weight.shape[:-1], -1, MXFP4_GROUP)
    largest = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0 ** -126)
    exponent = torch.ceil(torch.log2(largest / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    codes_values = torch.tensor(FP4_E2M1_VALUES[:8])                    # the magnitudes, codes 0..7
    magnitude_code = (scaled.abs()[..., None] - codes_values).abs().argmin(dim=-1)
    codes = (magnitude_code + 8 * (scaled < 0)).to(torch.uint8)         # sign bit 8
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)                  # value 2i in the low nibble
    return blocks, (exponent[..., 0] + 127).to(torch.uint8)


def write_mxfp4_checkpoint(source: str, target) -> str:
    """Copies the dequantized tiny GPT-OSS checkpoint `source` to `target` with its experts in MXFP4."""
    from safetensors.torch import load_file, save_file
    target = os.fspath(target)
    shutil.copytree(source, target)
    weights = {}
    for name in sorted(os.listdir(target)):
        if name.endswith(".safetensors") or name == "model.safetensors.index.json":
            if name.endswith(".safetensors"):
                weights.update(load_file(os.path.join(target, name)))
            os.remove(os.path.join(target, name))
    packed = {}
    for name, tensor in weights.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> [E, out, in]
            blocks, scales = quantize_mxfp4(tensor.transpose(1, 2))
            packed[f"{name}_blocks"], packed[f"{name}_scales"] = blocks, scales
        else:
            packed[name] = tensor
    save_file({name: tensor.contiguous() for name, tensor in packed.items()}, os.path.join(target, "model.safetensors"))
    config_path = os.path.join(target, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_NOT_CONVERTED}
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return target
