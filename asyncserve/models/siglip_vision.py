"""SigLIP's vision tower as Gemma 3 uses it (`vision_use_head` off): a fixed-size image cut into square
patches, a learned position per patch, pre-norm transformer blocks with plain full attention, and a final
LayerNorm; one output row per patch.

Eager by design, as Qwen2.5-VL's tower (models/qwen2_5_vl_vision.py): it runs once per image at the prefill
chunk that holds the image, and every image has the same shape, so a whole step's images go in one batch.
The checkpoint's own names; attention's Q, K, V fused as the language model's are (the loader fills
fused layers by name), its heads split over ranks; the rest plain torch layers, replicated (the tower is
small beside the language model)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncserve.layers.linear import Linear, qkv_linear


class SiglipAttention(nn.Module):
    """Q, K and V fused as the language model's (the loader fills qkv_proj from q_proj, k_proj, v_proj),
    split by heads over ranks, out_proj row-parallel."""

    def __init__(self, dim: int, num_heads: int, prefix: str):
        super().__init__()
        self.head_dim = dim // num_heads
        self.qkv_proj = qkv_linear(dim, num_heads, num_heads, self.head_dim, bias=True, prefix=f"{prefix}.qkv_proj")
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.out_proj = Linear(dim, dim, bias=True, quant_config=None, prefix=f"{prefix}.out_proj", parallel="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images, patches, _ = x.shape
        qkv = self.qkv_proj(x.flatten(0, 1)).view(images, patches, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                                  # [B, H, P, D] each
        out = F.scaled_dot_product_attention(q, k, v)                                   # every patch sees all
        return self.out_proj(out.transpose(1, 2).reshape(images * patches, -1)).view(images, patches, -1)


class SiglipMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config, prefix: str):
        super().__init__()
        dim, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = SiglipAttention(dim, config.num_attention_heads, f"{prefix}.self_attn")
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = SiglipMLP(dim, config.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Embedding(num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [B, P, E], row by row
        return patches + self.position_embedding.weight


class SiglipVisionModel(nn.Module):
    """pixel_values [B, C, S, S] -> [B, (S / patch)^2, E]."""

    def __init__(self, config):
        super().__init__()
        if getattr(config, "vision_use_head", False):
            raise ValueError("a SigLIP tower with its pooling head (vision_use_head) is not served: Gemma 3's "
                             "towers have none")
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(SiglipEncoderLayer(config, f"vision_tower.encoder.layers.{i}")
                                            for i in range(config.num_hidden_layers))
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)
