"""Qwen3-VL's vision tower: 16-pixel patches (two frames deep) embedded with a bias, plus a learned position
table (a square grid, bilinearly resampled to each image's patch grid), LayerNorm blocks of full attention
over the image with 2D rotary over each patch's (row, column), a merger that folds each 2x2 patch group into
one language-model token, and DeepStack: after chosen blocks, their own mergers give features that the
language model adds to the image rows of its first layers (models/qwen3_vl.py).

Eager, one image at a time, as Qwen2.5-VL's tower (models/qwen2_5_vl_vision.py, whose attention it shares);
without windows, every block attends over the whole image."""
from __future__ import annotations

import torch
from torch import nn

from asyncserve.models.qwen2_5_vl_vision import VisionAttention, embed_patches, encode_each, patch_positions


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear taps (align_corners) into a `side`-long table for positions `index` of an axis of `size`:
    ([N, 2] indices, [N, 2] weights), as transformers' _interpolation_axis_taps_weights computes them."""
    index = index.to(torch.float32)
    source = index * (side - 1) / torch.clamp(torch.tensor(size - 1), min=1)
    floor = torch.floor(source)
    offsets = torch.arange(0, 2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (source[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def position_taps(grid_h: int, grid_w: int, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([h*w, 4] rows of the learned position table, [h*w, 4] their weights) for each patch, in the
    processor's order (merge groups one after another)."""
    positions = patch_positions(grid_h, grid_w, merge)
    row_taps, row_weights = _axis_taps(positions[:, 0], grid_h, side)
    col_taps, col_weights = _axis_taps(positions[:, 1], grid_w, side)
    indices = (row_taps[:, :, None] * side + col_taps[:, None, :]).reshape(-1, 4)
    weights = (row_weights[:, :, None] * col_weights[:, None, :]).reshape(-1, 4)
    return indices, weights


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        if act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"Qwen3-VL's vision hidden_act {act!r} is not served (gelu_pytorch_tanh, gelu are)")
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU(approximate="tanh" if act == "gelu_pytorch_tanh" else "none")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin, None)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each group of merge x merge patches -> one token of the language model's width; the LayerNorm before
    the grouping (the last block's merger) or after it (DeepStack's)."""

    def __init__(self, config, norm_after_grouping: bool):
        super().__init__()
        self.group_dim = config.hidden_size * config.spatial_merge_size ** 2
        self.norm_after_grouping = norm_after_grouping
        self.norm = nn.LayerNorm(self.group_dim if norm_after_grouping else config.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.group_dim, self.group_dim)
        self.act = nn.GELU()
        self.linear_fc2 = nn.Linear(self.group_dim, config.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.group_dim)) if self.norm_after_grouping else self.norm(x).view(-1, self.group_dim)
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Qwen3VisionTransformer(nn.Module):
    """pixel patches of one or more images [P, C*T*ps*ps] and their grids [(t, h, w)] -> one
    [tokens, (1 + D) * E] tensor per image, tokens = t*h*w / merge^2: the merger's rows, then the D
    DeepStack mergers' rows, side by side (so the runner cuts them by row as one tensor)."""

    def __init__(self, config):
        super().__init__()
        self.merge = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.in_channels = getattr(config, "in_channels", 3)
        self.temporal_patch_size = config.temporal_patch_size
        dim = config.hidden_size
        self.patch_embed = nn.Module()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.patch_embed.proj = nn.Conv3d(self.in_channels, dim, kernel_size=kernel, stride=kernel, bias=True)
        self.pos_embed = nn.Embedding(config.num_position_embeddings, dim)
        self.grid_side = int(config.num_position_embeddings ** 0.5)
        head_dim = dim // config.num_heads
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        half = head_dim // 2  # rows rotate half of each head, columns the other half
        self.register_buffer("inv_freq", 1.0 / rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half),
                             persistent=False)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.merger = PatchMerger(config, norm_after_grouping=False)
        self.deepstack_blocks = list(config.deepstack_visual_indexes)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(config, norm_after_grouping=True)
                                                   for _ in self.deepstack_blocks)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        return encode_each(self.encode_one, pixel_values, grids)

    def encode_one(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        grid_t, grid_h, grid_w = grid
        x = embed_patches(self.patch_embed.proj, patches)
        device = x.device
        indices, weights = position_taps(grid_h, grid_w, self.grid_side, self.merge)
        indices, weights = indices.repeat(grid_t, 1).to(device), weights.repeat(grid_t, 1).to(device)
        x = x + (self.pos_embed(indices) * weights[:, :, None]).sum(1).to(x.dtype)      # [S, Ev]
        positions = patch_positions(grid_h, grid_w, self.merge).repeat(grid_t, 1).to(device)
        freqs = (positions[:, :, None].float() * self.inv_freq).flatten(1)             # [S, D/2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]                         # [S, 1, D]
        cos, sin = angles.cos(), angles.sin()
        frame = grid_h * grid_w
        deepstack = []
        for index, block in enumerate(self.blocks):
            # Each frame attends within itself (transformers' cu_seqlens); an image is one frame.
            x = torch.cat([block(x[start:start + frame], cos[start:start + frame], sin[start:start + frame])
                           for start in range(0, x.shape[0], frame)]) if grid_t > 1 else block(x, cos, sin)
            if index in self.deepstack_blocks:
                deepstack.append(self.deepstack_merger_list[self.deepstack_blocks.index(index)](x))
        return torch.cat([self.merger(x), *deepstack], dim=-1)                         # [N, (1 + D) E]
