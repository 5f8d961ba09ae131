"""Tuned fused-MoE tiles per token count, one JSON file per (experts, intermediate size, GPU, dtype) in
`moe_configs/`, named and keyed as vLLM names its fused-MoE configs (`scripts/tune_moe.py` writes them).

    E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json
    {"1": {"w13": {"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 64, ...}, "w2": {...}}, "2": ..., "4096": ...}

N is the intermediate size of one rank's experts (w2's last dim); bf16 and fp16 share a file (same element
size), float32 has its own (`,dtype=float32`). A batch takes the entry of the nearest token count (the
smaller on a tie). An entry may also be one flat vLLM config, then both GEMMs use it."""

import functools
import json
import os

import torch

from .moe_tiles import GemmTiles, MoeTiles

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe_configs")
_JSON_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")


def dtype_suffix(dtype):
    """The file name's dtype part: none for 16-bit floats, `,dtype=float32` for float32."""
    if dtype in (torch.bfloat16, torch.float16):
        return ""
    return ",dtype=" + str(dtype).removeprefix("torch.")


def config_file_name(num_experts, intermediate, device_name, dtype):
    return f"E={num_experts},N={intermediate},device_name={device_name}{dtype_suffix(dtype)}.json"


@functools.cache
def cuda_device_name(device):
    """torch's name of a CUDA device with spaces as underscores, as in the file names."""
    return torch.cuda.get_device_name(device).replace(" ", "_")


def _gemm_json(tiles):
    return dict(zip(_JSON_KEYS, tiles))


def _gemm_tiles(entry):
    return GemmTiles(*(int(entry[key]) for key in _JSON_KEYS))


def write_tuned_configs(path, tiles_by_tokens):
    """Writes {token count: MoeTiles} as a tuned file (keys in ascending token order)."""
    entries = {str(tokens): {"w13": _gemm_json(tiles.w13), "w2": _gemm_json(tiles.w2)}
               for tokens, tiles in sorted(tiles_by_tokens.items())}
    with open(path, "w") as f:
        json.dump(entries, f, indent=2)
        f.write("\n")


def read_tuned_configs(path):
    """A tuned file as {token count: MoeTiles}; a flat (vLLM) entry serves both GEMMs."""
    with open(path) as f:
        entries = json.load(f)
    table = {}
    for tokens, entry in entries.items():
        if "w13" in entry:
            tiles = MoeTiles(_gemm_tiles(entry["w13"]), _gemm_tiles(entry["w2"]))
        else:
            tiles = MoeTiles(_gemm_tiles(entry), _gemm_tiles(entry))
        if tiles.w13.block_m != tiles.w2.block_m:
            raise ValueError(f"{path}: at {tokens} tokens w13 and w2 have different BLOCK_SIZE_M "
                             "(the align step pads for one)")
        table[int(tokens)] = tiles
    return table


@functools.cache
def tuned_table(num_experts, intermediate, device_name, dtype, folder):
    """The tuned file for this layer shape and GPU, read once, as sorted ((tokens, MoeTiles), ...); None
    without one."""
    path = os.path.join(folder, config_file_name(num_experts, intermediate, device_name, dtype))
    if not os.path.exists(path):
        return None
    return tuple(sorted(read_tuned_configs(path).items()))


def nearest_tiles(table, num_tokens):
    """The entry of the token count nearest `num_tokens` (the smaller of two equally near)."""
    return min(table, key=lambda item: abs(item[0] - num_tokens))[1]


def tuned_tiles(num_tokens, num_experts, intermediate, device_name, dtype, folder=None):
    """The tuned tiles for a batch of `num_tokens`, or None where no file covers this shape and GPU."""
    table = tuned_table(num_experts, intermediate, device_name, dtype, folder or CONFIG_DIR)
    return None if table is None else nearest_tiles(table, num_tokens)
