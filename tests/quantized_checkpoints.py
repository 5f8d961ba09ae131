"""Tiny GPTQ and AWQ checkpoints for tests, written from the formats' descriptions (not asyncserve's
code): round-to-nearest quantization per group, packed as the public checkpoints store it, and beside
each a plain float32 checkpoint of the dequantized weights for transformers to run as the reference."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file

from tests.checkpoint_edits import copy_checkpoint

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Mixtral's experts are w1 (gate), w3 (up), w2 (down); its router `gate` stays in float, as the Qwen ones.
MIXTRAL_MODULES = LINEAR_MODULES[:4] + ("w1", "w2", "w3")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ writes output column AWQ_ORDER[i] of 8 at nibble i


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2**32) -> the int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's qweight: rows r*pack + j of q [K, N] at bits j*bits of word [r, n]."""
    pack = 32 // bits
    words = torch.zeros(q.shape[0] // pack, q.shape[1], dtype=torch.int64)
    for j in range(pack):
        words |= q[j::pack].to(torch.int64) << (bits * j)
    return to_int32(words)


def pack_columns(q: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """Columns c*pack + order[j] of q [R, C] at bits j*bits of word [r, c] (GPTQ qzeros: order = identity;
    AWQ qweight and qzeros: AWQ_ORDER)."""
    pack = 32 // bits
    order = order or range(pack)
    words = torch.zeros(q.shape[0], q.shape[1] // pack, dtype=torch.int64)
    for j, column in enumerate(order):
        words |= q[:, column::pack].to(torch.int64) << (bits * j)
    return to_int32(words)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    pack, mask = 32 // bits, (1 << bits) - 1
    return torch.stack([(words.to(torch.int64) >> (bits * j)) & mask for j in range(pack)], 1).reshape(
        -1, words.shape[1])


def unpack_columns(words: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    pack, mask = 32 // bits, (1 << bits) - 1
    order = list(order or range(pack))
    nibbles = [(words.to(torch.int64) >> (bits * order.index(column))) & mask for column in range(pack)]
    return torch.stack(nibbles, -1).reshape(words.shape[0], -1)


def quantize(weight: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor,
             min_zero: int = 0):
    """Round-to-nearest of weight [out, in] per (group of inputs, output): q [in, out], scales [G, out]
    fp16, zeros [G, out] ints; W[k, n] = (q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n]."""
    w = weight.t().float()                                       # [K, N]
    maxq = 2 ** bits - 1
    groups = int(g_idx.max()) + 1
    scales = torch.empty(groups, w.shape[1])
    zeros = torch.empty(groups, w.shape[1], dtype=torch.int64)
    for g in range(groups):
        rows = w[g_idx == g]
        if sym:
            scale = rows.abs().amax(0) / (2 ** (bits - 1) - 1)
            zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int64)
        else:
            low, high = rows.amin(0).clamp(max=0), rows.amax(0).clamp(min=0)
            scale = (high - low) / maxq
            zero = torch.round(-low / scale).to(torch.int64).clamp(min_zero, maxq)
        scales[g], zeros[g] = scale.half().float(), zero
    scales = scales.half()
    q = torch.clamp(torch.round(w / scales.float()[g_idx]) + zeros[g_idx], 0, maxq).to(torch.int64)
    return q, scales, zeros


def dequantize(q, scales, zeros, g_idx) -> torch.Tensor:
    """[out, in] float32: the weights transformers runs as the reference."""
    return ((q - zeros[g_idx]).float() * scales.float()[g_idx]).t().contiguous()


def _group_index(in_features: int, group_size: int, act_order: bool, generator) -> torch.Tensor:
    group_size = in_features if group_size == -1 else group_size
    if not act_order:
        return torch.arange(in_features) // group_size
    perm = torch.randperm(in_features, generator=generator)  # GPTQ's column order (by Hessian diagonal)
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[perm] = torch.arange(in_features) // group_size
    return g_idx


def build_quantized(source: str, target, fmt: str, bits: int = 4, group_size: int = 32, sym: bool = False,
                    act_order: bool = False, checkpoint_format: str = "gptq", config_file: bool = False,
                    seed: int = 0, linear_modules: tuple[str, ...] = LINEAR_MODULES) -> tuple[str, str]:
    """(quantized checkpoint, float32 checkpoint of its dequantized weights) from the tiny `source`.
    fmt 'gptq' or 'awq'; `config_file`: GPTQ's older quantize_config.json instead of config.json's entry;
    `linear_modules`: the layers to quantize, by their checkpoint names."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name in sorted(f for f in os.listdir(source) if f.endswith(".safetensors")):
        weights.update(load_file(os.path.join(source, name)))
    quantized, dequantized, g_indices = {}, {}, {}
    for name, tensor in weights.items():
        module = name.rpartition(".")[0]
        if not name.endswith(".weight") or module.rpartition(".")[2] not in linear_modules:
            quantized[name] = dequantized[name] = tensor
            continue
        in_features = tensor.shape[1]
        key = (module.rpartition(".")[0], in_features)  # q/k/v (gate/up) read one input: one g_idx
        if key not in g_indices:
            g_indices[key] = _group_index(in_features, group_size, act_order, generator)
        g_idx = g_indices[key]
        min_zero = 1 if fmt == "gptq" and checkpoint_format == "gptq" else 0  # v1 cannot store zero 0
        q, scales, zeros = quantize(tensor, bits, group_size, sym, g_idx, min_zero)
        dequantized[name] = dequantize(q, scales, zeros, g_idx)
        quantized[f"{module}.scales"] = scales
        if fmt == "gptq":
            stored_zeros = zeros - 1 if checkpoint_format == "gptq" else zeros
            quantized[f"{module}.qweight"] = pack_rows(q, bits)
            quantized[f"{module}.qzeros"] = pack_columns(stored_zeros, bits)
            quantized[f"{module}.g_idx"] = g_idx.to(torch.int32)
        else:
            quantized[f"{module}.qweight"] = pack_columns(q, 4, AWQ_ORDER)
            quantized[f"{module}.qzeros"] = pack_columns(zeros, 4, AWQ_ORDER)
    if fmt == "gptq":
        config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": act_order,
                  "sym": sym, "checkpoint_format": checkpoint_format}
    else:
        config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                  "version": "gemm"}
    target = os.fspath(target)
    path = copy_checkpoint(source, target, None if config_file else {"quantization_config": config},
                           quantized)
    if config_file:
        with open(os.path.join(path, "quantize_config.json"), "w") as f:
            json.dump({k: v for k, v in config.items() if k != "quant_method"}, f)
    reference = copy_checkpoint(source, target + "-dequantized", None, dequantized)
    return path, reference


def fp8_quantize(weight: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weight and its float32 scale (shape [] per tensor, [out, 1] per channel): amax maps to 448."""
    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (w / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


def build_fp8(source: str, target, per_channel_modules=("gate_proj", "up_proj", "down_proj"),
              static: bool = True, compressed_tensors: bool = False,
              linear_modules: tuple[str, ...] = LINEAR_MODULES) -> tuple[str, str]:
    """(FP8 checkpoint with quant_method 'fp8', float32 checkpoint of its dequantized weights): per-tensor
    scales elsewhere (so q/k/v shards each bring their own), a static input_scale per layer if asked.
    `compressed_tensors`: llm-compressor's config_groups and [1]-shaped scalars instead (one strategy:
    per_channel_modules all or none). `linear_modules`: the layers to quantize, by their checkpoint names."""
    weights = {}
    for name in sorted(f for f in os.listdir(source) if f.endswith(".safetensors")):
        weights.update(load_file(os.path.join(source, name)))
    quantized, dequantized = {}, {}
    for name, tensor in weights.items():
        module = name.rpartition(".")[0]
        leaf = module.rpartition(".")[2]
        if not name.endswith(".weight") or leaf not in linear_modules:
            quantized[name] = dequantized[name] = tensor
            continue
        q, scale = fp8_quantize(tensor, leaf in per_channel_modules)
        scalar_shape = (1,) if compressed_tensors else ()
        stored_scale = scale if leaf in per_channel_modules else scale.reshape(scalar_shape)
        quantized[name], quantized[f"{module}.weight_scale"] = q, stored_scale
        if static:
            quantized[f"{module}.input_scale"] = torch.tensor(0.01 + len(leaf) / 1000).reshape(scalar_shape)
        dequantized[name] = q.float() * scale
    config = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    if compressed_tensors:
        fp8 = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False,
               "strategy": "channel" if per_channel_modules else "tensor"}
        config = {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                  "quantization_status": "compressed", "config_groups": {"group_0": {
                      "targets": ["Linear"], "weights": fp8,
                      "input_activations": {**fp8, "strategy": "tensor"} if static else
                      {**fp8, "strategy": "token", "dynamic": True}}}}
    target = os.fspath(target)
    path = copy_checkpoint(source, target, {"quantization_config": config}, quantized)
    return path, copy_checkpoint(source, target + "-dequantized", None, dequantized)


def build_fp8_reference(source: str, target) -> str:
    """What `--quantization fp8` must serve: every linear weight through per-channel e4m3 and back."""
    weights = {}
    for name in sorted(f for f in os.listdir(source) if f.endswith(".safetensors")):
        weights.update(load_file(os.path.join(source, name)))
    dequantized = {}
    for name, tensor in weights.items():
        leaf = name.rpartition(".")[0].rpartition(".")[2]
        if name.endswith(".weight") and leaf in LINEAR_MODULES:
            q, scale = fp8_quantize(tensor, per_channel=True)
            tensor = q.float() * scale
        dequantized[name] = tensor
    return copy_checkpoint(source, target, None, dequantized)
