"""A prompt's images -> the expanded prompt and its `MultiModalInputs`, with the checkpoint's own image
processor (transformers', Pillow backend: the resize, patching and normalization the model was trained
with) and the family's rules (models/: tokens per image, M-RoPE positions).

The prompt names each image with one placeholder token (`<|image_pad|>`, as the chat template writes it);
each grows into as many copies as the encoder gives the image rows, as transformers' processor does.
Runs wherever the request is prepared: the server's worker thread, or the caller of `LLM.generate`."""
from __future__ import annotations

import logging
import threading

from asyncserve.errors import InvalidParameterError
from asyncserve.multimodal.images import InvalidImageError, checked_image, content_hash
from asyncserve.multimodal.inputs import ImageInput, MultiModalInputs

logger = logging.getLogger("asyncserve")


class ImageProcessor:
    """One per engine; `family` is the model class (its image rules), `path` the checkpoint folder."""

    def __init__(self, family, hf_config, path: str, limit_per_prompt: int, max_model_len: int):
        self.family = family
        self.hf_config = hf_config
        self.path = path
        self.limit_per_prompt = limit_per_prompt
        self.max_model_len = max_model_len
        self.placeholder_id = family.image_token_id(hf_config)
        self._hf_processor = None
        self._lock = threading.Lock()

    def hf_processor(self):
        """transformers' image processor of the checkpoint, loaded on first use (Pillow backend)."""
        with self._lock:
            if self._hf_processor is None:
                from transformers import AutoImageProcessor
                from transformers.utils import logging as hf_logging
                verbosity = hf_logging.get_verbosity()
                hf_logging.set_verbosity_error()  # "torchvision not installed: Pillow backend" is expected
                try:
                    self._hf_processor = AutoImageProcessor.from_pretrained(self.path)
                finally:
                    hf_logging.set_verbosity(verbosity)
            return self._hf_processor

    def process(self, token_ids: list[int], images: list, where: str = "multi_modal_data.image"
                ) -> tuple[list[int], MultiModalInputs]:
        """(prompt ids with each placeholder expanded, the images' inputs); raises InvalidImageError naming
        the image (`where[i]`) that cannot be used, InvalidParameterError for a count that does not fit."""
        if len(images) > self.limit_per_prompt:
            raise InvalidParameterError(f"The prompt carries {len(images)} images; this server takes at most "
                                        f"{self.limit_per_prompt} (--limit-mm-per-prompt).", where)
        slots = [index for index, token in enumerate(token_ids) if token == self.placeholder_id]
        if len(slots) != len(images):
            raise InvalidParameterError(
                f"The prompt has {len(slots)} image placeholder tokens for {len(images)} images: put one "
                "<|vision_start|><|image_pad|><|vision_end|> per image in the prompt (the chat template does "
                "this for image parts).", where)
        processor = self.hf_processor()
        expanded: list[int] = []
        inputs: list[ImageInput] = []
        cursor = 0
        for index, (slot, image) in enumerate(zip(slots, images)):
            name = f"{where} (image {index})"
            image = checked_image(image, name)
            try:
                out = processor(images=[image], return_tensors="pt")
            except (ValueError, OSError) as exc:  # e.g. an aspect ratio past 200:1, a side under a patch
                raise InvalidImageError(f"{name} cannot be processed for this model: {exc}", name) from None
            grid = tuple(int(v) for v in out["image_grid_thw"][0].tolist())
            length = self.family.image_num_tokens(self.hf_config, grid)
            expanded.extend(token_ids[cursor:slot])
            offset = len(expanded)
            expanded.extend([self.placeholder_id] * length)
            cursor = slot + 1
            inputs.append(ImageInput(offset, length, grid, out["pixel_values"], content_hash(image)))
            if len(expanded) >= self.max_model_len:
                break  # the length check below names the prompt; no need to process the rest
        expanded.extend(token_ids[cursor:])
        positions, delta = self.family.rope_positions(
            self.hf_config, len(expanded), [(image.offset, image.length, image.grid) for image in inputs])
        return expanded, MultiModalInputs(inputs, positions, delta)


def make_image_processor(model_config):
    """The engine's ImageProcessor, or None when its model takes no images."""
    from asyncserve.models.registry import model_class
    family = model_class(model_config.hf_config)
    if not getattr(family, "supports_images", False) or model_config.is_pooling:
        return None
    return ImageProcessor(family, model_config.hf_config, model_config.path,
                          model_config.limit_mm_per_prompt.get("image", 0), model_config.max_model_len)
