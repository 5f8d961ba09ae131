"""Qwen2.5-VL's vision tower: 14-pixel patches (two frames deep) embedded, transformer blocks attending
within 112-pixel windows except a few blocks of full attention, 2D rotary over each patch's (row, column),
and a merger that folds each 2x2 patch group into one language-model token.

Eager by design: it runs once per image, at the prefill chunk that first covers the image's tokens, and
its shapes change with every image size, which CUDA graphs cannot replay. Attention is torch's SDPA
over one image at a time: the whole image in the full-attention blocks, and in the others its windows as
a batch of short sequences (padded to the longest window, padding keys masked). A block mask over all of
an image's patches instead kept SDPA off its fused kernels and cost O(patches^2) per block (3,888 patches
for a 1024x768 image). The patch embedding is a 3D convolution whose stride equals its kernel: one matmul
over the flattened patches, done as such (cuDNN's convolution is much slower at this shape). Attention and merger are plain torch layers
(replicated under tensor parallelism: the tower is small beside the language model); the MLP's gate|up is
fused as the language model's, since the loader maps those checkpoint names onto a fused layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncserve.layers.activation import SiluAndMul
from asyncserve.layers.linear import Linear, MergedLinear
from asyncserve.layers.norm import RMSNorm


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def embed_patches(proj: nn.Conv3d, patches: torch.Tensor) -> torch.Tensor:
    """A convolution whose stride is its kernel, over patches already cut and flattened: one linear map."""
    weight = proj.weight                                                                    # [E, C, T, p, p]
    return F.linear(patches.to(weight.dtype).view(-1, weight[0].numel()), weight.view(weight.shape[0], -1),
                    proj.bias)


def patch_positions(grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """[h*w, 2] (row, column) of each patch, in the processor's order: 2x2 merge groups one after another."""
    rows = torch.arange(grid_h)[:, None].expand(grid_h, grid_w)
    cols = torch.arange(grid_w)[None, :].expand(grid_h, grid_w)
    shape = (grid_h // merge, merge, grid_w // merge, merge)
    return torch.stack([rows.reshape(shape).transpose(1, 2).flatten(),
                        cols.reshape(shape).transpose(1, 2).flatten()], dim=-1)


def window_order(grid_t: int, grid_h: int, grid_w: int, merge: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order of the merge groups window by window [G], window id of each group in that order [G]), where a
    window is `window` x `window` merge groups (the last ones in a row or column cut short)."""
    llm_h, llm_w = grid_h // merge, grid_w // merge
    index = torch.arange(grid_t * llm_h * llm_w).reshape(grid_t, llm_h, llm_w)
    pad_h, pad_w = window - llm_h % window, window - llm_w % window
    padded = F.pad(index, (0, pad_w, 0, pad_h), value=-1)
    windows_h, windows_w = (llm_h + pad_h) // window, (llm_w + pad_w) // window
    padded = padded.reshape(grid_t, windows_h, window, windows_w, window).permute(0, 1, 3, 2, 4)
    padded = padded.reshape(grid_t * windows_h * windows_w, window * window)
    window_ids = torch.arange(padded.shape[0])[:, None].expand_as(padded)
    keep = padded >= 0
    return padded[keep], window_ids[keep]


class Windows:
    """An image's attention windows as a padded batch: `gather` [W, L] picks each window's patches (they are
    contiguous, window by window; padding repeats a window's last patch), `valid` [W, L] marks the real ones,
    and `key_mask` [W, 1, 1, L] lets every query see its window's real keys only."""

    def __init__(self, patch_windows: torch.Tensor, device: torch.device):
        """`patch_windows` [S] on the host (its longest window sizes the batch: no device sync)."""
        counts = torch.bincount(patch_windows)
        counts = counts[counts > 0]
        starts = torch.cumsum(counts, 0) - counts
        columns = torch.arange(int(counts.max()))
        valid = columns[None, :] < counts[:, None]
        self.gather = (starts[:, None] + torch.minimum(columns[None, :], counts[:, None] - 1)).to(device)
        self.valid = valid.to(device)
        self.key_mask = self.valid[:, None, None, :]


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, windows: Windows | None):
        num_patches = x.shape[0]
        q, k, v = self.qkv(x).view(num_patches, 3, self.num_heads, -1).unbind(1)   # [S, H, D] each
        dtype = q.dtype
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(dtype)
        if windows is None:
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                                 v.transpose(0, 1)).transpose(0, 1)   # [S, H, D]
        else:
            q, k, v = (t[windows.gather].transpose(1, 2) for t in (q, k, v))          # [W, H, L, D]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=windows.key_mask)
            out = out.transpose(1, 2)[windows.valid]                                  # [S, H, D]
        return self.proj(out.reshape(num_patches, -1))


class VisionMLP(nn.Module):
    """SwiGLU with biases, gate|up fused as in the language model (the loader fills gate_proj / up_proj)."""

    def __init__(self, dim: int, hidden: int, prefix: str):
        super().__init__()
        self.gate_up_proj = MergedLinear(dim, {"gate_proj": hidden, "up_proj": hidden}, bias=True,
                                         quant_config=None, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = Linear(hidden, dim, bias=True, quant_config=None, prefix=f"{prefix}.down_proj",
                                parallel="row")
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, 1e-6)
        self.norm2 = RMSNorm(config.hidden_size, 1e-6)
        self.attn = VisionAttention(config.hidden_size, config.num_heads)
        self.mlp = VisionMLP(config.hidden_size, config.intermediate_size, f"{prefix}.mlp")

    def forward(self, x, cos, sin, windows):
        x = x + self.attn(self.norm1(x), cos, sin, windows)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each group of merge x merge patches -> one token of the language model's width."""

    def __init__(self, out_dim: int, dim: int, merge: int):
        super().__init__()
        self.group_dim = dim * merge * merge
        self.ln_q = RMSNorm(dim, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.group_dim, self.group_dim), nn.GELU(),
                                 nn.Linear(self.group_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.group_dim))


class Qwen2_5_VisionTransformer(nn.Module):
    """pixel patches of one or more images [P, C*T*ps*ps] and their grids [(t, h, w)] -> one [tokens, E]
    tensor per image, tokens = t*h*w / merge^2."""

    def __init__(self, config):
        super().__init__()
        self.merge = config.spatial_merge_size
        self.patch_size = config.patch_size
        self.window = config.window_size // config.spatial_merge_size // config.patch_size
        self.full_attention_blocks = frozenset(config.fullatt_block_indexes)
        self.in_channels = getattr(config, "in_channels", 3)
        self.temporal_patch_size = config.temporal_patch_size
        dim = config.hidden_size
        self.patch_embed = nn.Module()
        kernel = (config.temporal_patch_size, config.patch_size, config.patch_size)
        self.patch_embed.proj = nn.Conv3d(self.in_channels, dim, kernel_size=kernel, stride=kernel, bias=False)
        head_dim = dim // config.num_heads
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        half = head_dim // 2  # rows rotate half of each head, columns the other half
        self.register_buffer("inv_freq", 1.0 / rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half),
                             persistent=False)
        self.blocks = nn.ModuleList(VisionBlock(config, f"visual.blocks.{i}") for i in range(config.depth))
        self.merger = PatchMerger(config.out_hidden_size, dim, self.merge)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        return encode_each(self.encode_one, pixel_values, grids)

    def encode_one(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        grid_t, grid_h, grid_w = grid
        unit = self.merge * self.merge
        x = embed_patches(self.patch_embed.proj, patches)
        order, window_ids = window_order(grid_t, grid_h, grid_w, self.merge, self.window)
        device = x.device
        windows = Windows(window_ids.repeat_interleave(unit), device)
        order = order.to(device)
        # Patches regrouped window by window (whole merge groups move together), rotary likewise.
        x = x.view(-1, unit, x.shape[-1])[order].flatten(0, 1)
        positions = patch_positions(grid_h, grid_w, self.merge).repeat(grid_t, 1).to(device)
        freqs = (positions[:, :, None].float() * self.inv_freq).flatten(1)             # [S, D/2]
        freqs = freqs.view(-1, unit, freqs.shape[-1])[order].flatten(0, 1)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]                         # [S, 1, D]
        cos, sin = angles.cos(), angles.sin()
        for index, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if index in self.full_attention_blocks else windows)
        merged = self.merger(x)
        return merged[torch.argsort(order)]


def encode_each(encode_one, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    """The step's images, concatenated patch rows, encoded one by one (each image's own attention window):
    `encode_one(patches, grid)` per image, in order."""
    outputs, start = [], 0
    for grid in grids:
        num_patches = grid[0] * grid[1] * grid[2]
        outputs.append(encode_one(pixel_values[start:start + num_patches], grid))
        start += num_patches
    return outputs
