"""Qwen3-VL (`Qwen3VLForConditionalGeneration`, dense): Qwen3's decoder (q/k norm, no qkv bias) on our paged
layers with interleaved M-RoPE (layers/mrope.py), and its vision tower (models/qwen3_vl_vision.py), whose
merged patch embeddings replace the prompt's <|image_pad|> rows before the first layer.

DeepStack: the tower also gives, per image token, one feature per chosen vision block, and the language
model adds the k-th of them to the image rows' hidden states after its k-th layer (transformers'
`_deepstack_process`). The runner keeps and cuts an image's encoder output by row as one tensor, so the
tower returns the features side by side with the merged embeddings ([N, (1 + D) E]) and this forward splits
them; only steps with image rows take that path, and those run eagerly (runner/model_runner.py).

The image rules (tokens per image, rotary positions) are Qwen2.5-VL's: an image is one frame here, whose
positions transformers' Qwen3-VL get_rope_index computes as Qwen2.5-VL's does."""
from __future__ import annotations

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from asyncserve.models.qwen3_vl_vision import Qwen3VisionTransformer


class Qwen3VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    qkv_bias = False
    qk_norm = True
    other_architectures = ()
    vision_tower = Qwen3VisionTransformer
    mrope_interleaved = True  # transformers' Qwen3-VL always interleaves; the checkpoints say so too

    def __init__(self, hf_config, quant_config=None):
        super().__init__(hf_config, quant_config)
        self.num_deepstack = len(hf_config.vision_config.deepstack_visual_indexes)
        if self.num_deepstack > len(self.layers):
            raise ValueError(f"{self.num_deepstack} DeepStack vision blocks for {len(self.layers)} decoder layers")

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`image_embeds`: (rows of the flat batch, their [N, (1 + D) E] encoder outputs): the first E columns
        replace the placeholder embeddings, the k-th next E are added to those rows after layer k."""
        if image_embeds is None:
            return super().forward(input_ids, positions, meta)
        rows, values = image_embeds
        hidden = self.embed_tokens(input_ids)                                  # [T, E]
        values = values.to(hidden.dtype).view(rows.shape[0], 1 + self.num_deepstack, hidden.shape[-1])
        hidden = hidden.index_copy(0, rows, values[:, 0])
        residual = None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, residual, meta)
            if index < self.num_deepstack:
                # The layer's output whole (its residual add done here, not fused into the next norm), as
                # transformers adds the features to it.
                hidden = (hidden + residual).index_add(0, rows, values[:, 1 + index])
                residual = None
        return self.norm(hidden) if residual is None else self.norm(hidden, residual)[0]
