"""Gemma 3 with images (`Gemma3ForConditionalGeneration`, the 4B, 12B and 27B checkpoints): Gemma 3's
text model (models/gemma.py) whose <image_soft_token> rows take a SigLIP tower's patches
(models/siglip_vision.py), average-pooled to `mm_tokens_per_image` (256) per image, RMS-normed and
projected to the text width.

An image's tokens attend to each other both ways in the language model (transformers'
`token_type_ids` mask: causal OR same image, and within the sliding window on local layers). Our attention
takes that as `key_ends` (layers/attention.py: each image row sees keys up to its image's end), set by the
runner for steps that hold image rows (runner/images.py); the scheduler keeps each image inside one prefill
chunk, so its later tokens are in the pool when its first ones attend (`whole_image_tokens`).

The family's image rules are class methods, read by asyncserve/multimodal/ through the registry: the
prompt's <start_of_image> per image grows into "\\n\\n<start_of_image>", 256 image tokens,
"<end_of_image>\\n\\n", as Gemma3Processor writes it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asyncserve.layers.attention import AttentionMetadata
from asyncserve.layers.norm import GemmaRMSNorm
from asyncserve.layers.quantization import QuantizationConfig
from asyncserve.models.gemma import Gemma3ForCausalLM
from asyncserve.models.siglip_vision import SiglipVisionModel

# Checkpoint prefixes -> ours. The Hub's checkpoints (saved by transformers 4) have `language_model.model.`,
# `language_model.lm_head.`, `vision_tower.vision_model.`; transformers 5 names them `model.language_model.`,
# `lm_head.`, `model.vision_tower.` in memory, and saves the tower as `vision_tower.` (SigLIP's
# `vision_model` level is gone there, as in ours).
_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
             ("language_model.lm_head.", "lm_head."), ("model.vision_tower.", "vision_tower."),
             ("model.multi_modal_projector.", "multi_modal_projector."))
_VISION_PARTS = ("vision_tower.", "multi_modal_projector.")


class Gemma3MultiModalProjector(nn.Module):
    """[B, P, Ev] patch rows -> [B, mm_tokens_per_image, E]: the patch grid average-pooled square by square,
    Gemma's RMSNorm, then a plain matrix (no bias) to the text width."""

    def __init__(self, hf_config):
        super().__init__()
        vision = hf_config.vision_config
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(vision.hidden_size, hf_config.hidden_size))
        self.mm_soft_emb_norm = GemmaRMSNorm(vision.hidden_size, vision.layer_norm_eps)
        self.patches_per_side = vision.image_size // vision.patch_size
        tokens_per_side = int(hf_config.mm_tokens_per_image ** 0.5)
        if tokens_per_side ** 2 != hf_config.mm_tokens_per_image or self.patches_per_side % tokens_per_side:
            raise ValueError(f"mm_tokens_per_image={hf_config.mm_tokens_per_image} must be a square whose side "
                             f"divides the {self.patches_per_side} patches of an image's side")
        self.kernel = self.patches_per_side // tokens_per_side

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        images, _, width = patches.shape
        grid = patches.transpose(1, 2).reshape(images, width, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel).flatten(2).transpose(1, 2)             # [B, N, Ev]
        normed = self.mm_soft_emb_norm(pooled.reshape(-1, width)).view_as(pooled)
        return torch.matmul(normed, self.mm_input_projection_weight).type_as(patches)   # [B, N, E]


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    supports_images = True
    other_architectures = ()

    def __init__(self, hf_config, quant_config: QuantizationConfig | None = None):
        super().__init__(hf_config, quant_config)
        self.vision_tower = SiglipVisionModel(hf_config.vision_config)
        self.multi_modal_projector = Gemma3MultiModalProjector(hf_config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`image_embeds`: (rows of the flat batch, their [N, E] image embeddings), written over the image
        tokens' scaled embeddings (as transformers does: the image rows are not scaled by sqrt(E))."""
        if image_embeds is None:
            return super().forward(input_ids, positions, meta)
        # An image token id past the vocabulary is embedded as id 0 (as transformers does); its row is replaced.
        input_ids = torch.where(input_ids < self.embed_tokens.vocab_size, input_ids, 0)
        rows, values = image_embeds
        hidden = self.embed(input_ids).index_copy(0, rows, values.to(self.embed_scale.dtype))
        return self.run_layers(hidden, positions, meta)

    def embed_images(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """[B, C, S, S] pixels of B images -> one [mm_tokens_per_image, E] tensor per image."""
        projected = self.multi_modal_projector(self.vision_tower(pixel_values))
        return list(projected.unbind(0))

    def checkpoint_name(self, name: str) -> str | None:
        for theirs, ours in _PREFIXES:
            if name.startswith(theirs):
                name = ours + name.removeprefix(theirs)
                break
        name = name.replace("vision_tower.vision_model.", "vision_tower.", 1)
        if name.startswith(_VISION_PARTS):
            return name
        return super().checkpoint_name(name)

    # ---- the family's image rules (read before the model exists) ----------------------------------

    @classmethod
    def image_token_id(cls, hf_config) -> int:
        """The token of an image's rows (<image_soft_token>)."""
        return hf_config.image_token_id

    @classmethod
    def image_placeholder_id(cls, hf_config) -> int:
        """The token a prompt holds once per image (the chat template's <start_of_image>)."""
        return hf_config.boi_token_id

    @classmethod
    def image_wrapping(cls, hf_config) -> tuple[str, list[int], list[int], str]:
        """Gemma3Processor's full_image_sequence around the rows: "\\n\\n<start_of_image>" and
        "<end_of_image>\\n\\n"."""
        return "\n\n", [hf_config.boi_token_id], [hf_config.eoi_token_id], "\n\n"

    @classmethod
    def image_grid(cls, hf_config, processed) -> tuple[int, int, int]:
        """(1, rows, columns) of patches of the resized image; pan-and-scan crops are refused."""
        crops = processed.get("num_crops")
        if crops is not None and int(torch.as_tensor(crops).sum()) > 0:
            raise ValueError("pan-and-scan crops (do_pan_and_scan in preprocessor_config.json) are not served; "
                             "turn it off")
        patch = hf_config.vision_config.patch_size
        height, width = processed["pixel_values"].shape[-2:]
        return 1, height // patch, width // patch

    @classmethod
    def image_num_tokens(cls, hf_config, grid: tuple[int, int, int]) -> int:
        return hf_config.mm_tokens_per_image

    @classmethod
    def whole_image_tokens(cls, hf_config) -> int:
        return hf_config.mm_tokens_per_image

    @classmethod
    def rope_positions(cls, hf_config, num_tokens: int, images: list) -> tuple[None, int]:
        """Plain rotary: image tokens take their sequence positions."""
        return None, 0
