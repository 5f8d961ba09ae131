"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2's decoder on our paged layers with Qwen's
multimodal rotary (layers/mrope.py), and its vision tower (models/qwen2_5_vl_vision.py), whose merged patch
embeddings replace the prompt's <|image_pad|> rows before the first layer.

The family's image rules live here as class methods, read by asyncserve/multimodal/ through the registry:
how many tokens an image of a given patch grid becomes, and the three-part rotary positions of a prompt
with images (transformers' `get_rope_index`)."""
from __future__ import annotations

import torch

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.layers.mrope import MRotaryEmbedding
from asyncserve.layers.pre_norm_block import run_pre_norm_layers
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.layers.rotary import rope_parameters
from asyncserve.models.llama import Qwen2ForCausalLM
from asyncserve.models.qwen2_5_vl_vision import Qwen2_5_VisionTransformer

# Checkpoint prefixes: transformers 5 saves the nested layout, the Hub's checkpoints the flat one.
_NESTED = (("model.language_model.", "model."), ("model.visual.", "visual."))


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    supports_images = True
    other_architectures = ()
    vision_tower = Qwen2_5_VisionTransformer
    mrope_interleaved = False  # M-RoPE's layout when the config's rope parameters leave it unsaid
    supports_aux_hidden_states = False  # its own forward (image embeddings) collects none

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__(hf_config, quant_config)
        theta, scaling = rope_parameters(hf_config)
        section = scaling.get("mrope_section")
        if section is None:
            raise ValueError(f"{type(self).__name__}'s config has no rope mrope_section: is this checkpoint "
                             "of that family?")
        interleaved = bool(scaling.get("mrope_interleaved", self.mrope_interleaved))
        for layer in self.layers:
            attention = layer.self_attn
            attention.rotary = MRotaryEmbedding(attention.head_dim, hf_config.max_position_embeddings, theta,
                                                scaling, list(section), interleaved)
        self.visual = self.vision_tower(hf_config.vision_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`image_embeds`: (rows of the flat batch, their [N, E] image embeddings), written over the
        placeholder tokens' embeddings; positions [T] or [3, T] (layers/mrope.py)."""
        hidden = self.embed_tokens(input_ids)
        if image_embeds is not None:
            rows, values = image_embeds
            hidden = hidden.index_copy(0, rows, values.to(hidden.dtype))
        return run_pre_norm_layers(self.layers, self.norm, hidden, positions, meta)

    def embed_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """Patches of one or more images (processor order) -> one [tokens, E] tensor per image."""
        return self.visual(pixel_values, grids)

    def captures_mixed_steps(self) -> bool:
        return True  # steps with image rows or [3, T] positions skip the graphs (runner/model_runner.py)

    def checkpoint_name(self, name: str) -> str | None:
        for nested, flat in _NESTED:
            if name.startswith(nested):
                name = flat + name.removeprefix(nested)
        if name.startswith("visual."):
            return name
        return super().checkpoint_name(name)

    # ---- the family's image rules (read before the model exists) ----------------------------------

    @classmethod
    def image_token_id(cls, hf_config) -> int:
        """The token of an image's rows (the encoder's output replaces their embeddings)."""
        return hf_config.image_token_id

    @classmethod
    def image_placeholder_id(cls, hf_config) -> int:
        """The token a prompt holds once per image (the chat template's <|image_pad|>)."""
        return hf_config.image_token_id

    @classmethod
    def image_wrapping(cls, hf_config) -> tuple[str, list[int], list[int], str]:
        """(text, tokens) before and (tokens, text) after an image's rows in the expanded prompt: none here,
        the prompt's own <|vision_start|> and <|vision_end|> stay around the placeholder."""
        return "", [], [], ""

    @classmethod
    def image_grid(cls, hf_config, processed) -> tuple[int, int, int]:
        """(frames, rows, columns) of patches of one image from the image processor's output."""
        return tuple(int(v) for v in processed["image_grid_thw"][0].tolist())

    @classmethod
    def image_num_tokens(cls, hf_config, grid: tuple[int, int, int]) -> int:
        merge = hf_config.vision_config.spatial_merge_size
        return grid[0] * grid[1] * grid[2] // (merge * merge)

    @classmethod
    def rope_positions(cls, hf_config, num_tokens: int, images: list[tuple[int, int, tuple[int, int, int]]]
                       ) -> tuple[torch.Tensor, int]:
        """([3, P] positions of the prompt's first P tokens, P the end of its last image; the delta that
        every later token's position gets), as transformers' get_rope_index: text advances all three by
        one per token; an image's tokens take (start, start + row, start + column) over its merged grid, and
        the text after it continues from start + max(rows, columns). `images`: (offset, length, grid)."""
        merge = hf_config.vision_config.spatial_merge_size
        parts, position, cursor = [], 0, 0
        for offset, length, (grid_t, grid_h, grid_w) in images:
            text = offset - cursor
            parts.append(torch.arange(position, position + text).expand(3, -1))
            position += text
            rows, cols = grid_h // merge, grid_w // merge
            t_index = torch.arange(grid_t).view(-1, 1, 1).expand(grid_t, rows, cols).flatten()
            h_index = torch.arange(rows).view(1, -1, 1).expand(grid_t, rows, cols).flatten()
            w_index = torch.arange(cols).view(1, 1, -1).expand(grid_t, rows, cols).flatten()
            parts.append(torch.stack([t_index, h_index, w_index]) + position)
            position += max(rows, cols)
            cursor = offset + length
        positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.int64)
        return positions, position - cursor
