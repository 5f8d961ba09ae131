"""A prompt's images -> the expanded prompt and its `MultiModalInputs`, with the checkpoint's own image
processor (transformers', Pillow backend: the resize, patching and normalization the model was trained
with) and the family's rules (models/: tokens per image, M-RoPE positions).

The prompt names each image with one placeholder token (Qwen's `<|image_pad|>`, Gemma 3's
`<start_of_image>`, as the chat template writes it); each grows into as many image tokens as the encoder
gives the image rows, wrapped as the family's processor wraps them (Gemma 3: "\n\n<start_of_image>",
the rows, "<end_of_image>\n\n"), as transformers' processor does. A newline run that such wrapping text
continues is tokenized whole, as the tokenizer reads the expanded text (Gemma's "\n\n\n" is one token; vLLM
joins them the same way). Runs wherever the request is prepared: the server's worker thread, or the
caller of `LLM.generate`."""
from __future__ import annotations

import logging
import threading

from asyncserve.errors import InvalidParameterError
from asyncserve.multimodal.images import InvalidImageError, checked_image, content_hash
from asyncserve.multimodal.inputs import ImageInput, MultiModalInputs

logger = logging.getLogger("asyncserve")


class ImageProcessor:
    """One per engine; `family` is the model class (its image rules), `path` the checkpoint folder."""

    def __init__(self, family, hf_config, path: str, limit_per_prompt: int, max_model_len: int, tokenizer=None):
        self.family = family
        self.hf_config = hf_config
        self.path = path
        self.limit_per_prompt = limit_per_prompt
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer  # for the wrapping text of families that have one
        self.placeholder_id = family.image_placeholder_id(hf_config)
        self.row_id = family.image_token_id(hf_config)
        self.text_before, self.ids_before, self.ids_after, self.text_after = family.image_wrapping(hf_config)
        self.whole_images = family.whole_image_tokens(hf_config) is not None
        self._newline_counts: dict[int, int] = {}
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
                f"{self._placeholder_text()} per image in the prompt (the chat template does this for image "
                "parts).", where)
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
            grid = self.family.image_grid(self.hf_config, out)
            length = self.family.image_num_tokens(self.hf_config, grid)
            self._extend(expanded, token_ids[cursor:slot])
            self._extend(expanded, self._encode(self.text_before))
            expanded.extend(self.ids_before)
            offset = len(expanded)
            expanded.extend([self.row_id] * length)
            expanded.extend(self.ids_after)
            self._extend(expanded, self._encode(self.text_after))
            cursor = slot + 1
            inputs.append(ImageInput(offset, length, grid, out["pixel_values"], content_hash(image)))
            if len(expanded) >= self.max_model_len:
                break  # the length check below names the prompt; no need to process the rest
        self._extend(expanded, token_ids[cursor:])
        positions, delta = self.family.rope_positions(
            self.hf_config, len(expanded), [(image.offset, image.length, image.grid) for image in inputs])
        return expanded, MultiModalInputs(inputs, positions, delta, whole_images=self.whole_images)

    def _placeholder_text(self) -> str:
        if self.tokenizer is None:
            return f"token {self.placeholder_id}"
        return self.tokenizer.convert_ids_to_tokens(self.placeholder_id)

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        if self.tokenizer is None:
            raise ValueError("this family wraps images in text: the image processor needs the tokenizer")
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _newlines(self, token: int) -> int:
        """How many newlines the token is, 0 if it is anything else."""
        count = self._newline_counts.get(token)
        if count is None:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else ""
            count = len(text) if text and set(text) == {"\n"} else 0
            self._newline_counts[token] = count
        return count

    def _extend(self, expanded: list[int], tokens: list[int]) -> None:
        """expanded += tokens, a newline run across the seam tokenized whole (only where wrapping text
        meets the prompt's own tokens; a family without wrapping text never joins)."""
        if not (self.text_before or self.text_after) or not expanded or not tokens:
            expanded.extend(tokens)
            return
        tail = head = 0
        while tail < len(expanded) and self._newlines(expanded[-1 - tail]):
            tail += 1
        while head < len(tokens) and self._newlines(tokens[head]):
            head += 1
        if not tail or not head:
            expanded.extend(tokens)
            return
        run = sum(self._newlines(token) for token in expanded[len(expanded) - tail:] + tokens[:head])
        del expanded[len(expanded) - tail:]
        expanded.extend(self._encode("\n" * run))
        expanded.extend(tokens[head:])


def make_image_processor(model_config, tokenizer=None):
    """The engine's ImageProcessor, or None when its model takes no images."""
    from asyncserve.models.registry import model_class
    family = model_class(model_config.hf_config)
    if not getattr(family, "supports_images", False) or model_config.is_pooling:
        return None
    return ImageProcessor(family, model_config.hf_config, model_config.path,
                          model_config.limit_mm_per_prompt.get("image", 0), model_config.max_model_len, tokenizer)
