"""The tiny Qwen2.5-VL, Qwen3-VL and Gemma 3 checkpoints' transformers references, prompts and images, shared by the
vision tests."""
from __future__ import annotations

import io

import numpy as np
import torch

PROMPT_ONE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe the quick brown fox"
              "<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TWO = ("<|im_start|>user\nfirst <|vision_start|><|image_pad|><|vision_end|> then "
              "<|vision_start|><|image_pad|><|vision_end|> compare<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEXT = "<|im_start|>user\nthe quick brown fox jumps<|im_end|>\n<|im_start|>assistant\n"


def image(width: int, height: int, seed: int):
    from PIL import Image
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (height, width, 3), dtype=np.uint8))


def png_bytes(img) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


class Reference:
    """transformers' Qwen2_5_VLForConditionalGeneration (or the checkpoint's Qwen3VLForConditionalGeneration) on
    the same checkpoint, its inputs built as its processor builds them: each <|image_pad|> of the text repeated
    grid.prod() / merge^2 times, then tokenized."""

    def __init__(self, path: str):
        import transformers
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        architecture = AutoConfig.from_pretrained(path).architectures[0]
        self.model = getattr(transformers, architecture).from_pretrained(path, dtype=torch.float32).eval()
        self.image_token_id = self.model.config.image_token_id

    def inputs(self, prompt: str, images: list) -> dict:
        if not images:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        processed = self.image_processor(images=images, return_tensors="pt")
        pieces = prompt.split("<|image_pad|>")
        counts = (processed["image_grid_thw"].prod(-1) // 4).tolist()
        text = pieces[0] + "".join("<|image_pad|>" * n + piece for n, piece in zip(counts, pieces[1:]))
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": processed["pixel_values"],
                "image_grid_thw": processed["image_grid_thw"],
                "mm_token_type_ids": (ids == self.image_token_id).int()}

    @torch.no_grad()
    def greedy(self, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt ids, generated ids)."""
        inputs = self.inputs(prompt, images)
        out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        prompt_ids = inputs["input_ids"][0].tolist()
        return prompt_ids, out[0, len(prompt_ids):].tolist()


GEMMA_ONE = "<bos><start_of_turn>user\n<start_of_image>describe the quick brown fox<end_of_turn>\n<start_of_turn>model\n"
GEMMA_TWO = ("<bos><start_of_turn>user\nfirst <start_of_image> then<start_of_image>compare<end_of_turn>\n"
             "<start_of_turn>model\n")
GEMMA_TEXT = "<bos><start_of_turn>user\nthe quick brown fox jumps<end_of_turn>\n<start_of_turn>model\n"


class GemmaReference:
    """transformers' Gemma3ForConditionalGeneration on the same checkpoint, its inputs from transformers'
    own Gemma3Processor (the image sequence and token_type_ids, which turn on the bidirectional mask over
    each image's tokens in the prefill)."""

    def __init__(self, path: str):
        from transformers import AutoImageProcessor, AutoTokenizer, Gemma3ForConditionalGeneration, Gemma3Processor
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = Gemma3ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        self.processor = Gemma3Processor(image_processor=AutoImageProcessor.from_pretrained(path),
                                         tokenizer=self.tokenizer,
                                         image_seq_length=self.model.config.mm_tokens_per_image)
        self.image_token_id = self.model.config.image_token_id

    def inputs(self, prompt: str, images: list) -> dict:
        if not images:
            ids = self.tokenizer(prompt, return_tensors="pt").input_ids
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        return dict(self.processor(text=prompt, images=images, return_tensors="pt"))

    @torch.no_grad()
    def greedy(self, prompt: str, images: list, max_tokens: int) -> tuple[list[int], list[int]]:
        """(prompt ids, generated ids)."""
        inputs = self.inputs(prompt, images)
        out = self.model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)
        prompt_ids = inputs["input_ids"][0].tolist()
        return prompt_ids, out[0, len(prompt_ids):].tolist()

    @torch.no_grad()
    def next_logprobs(self, prompt: str, images: list, bidirectional: bool = True) -> torch.Tensor:
        """[V] log-probabilities of the first generated token; `bidirectional=False` drops token_type_ids,
        so transformers attends causally over the image's tokens too."""
        inputs = self.inputs(prompt, images)
        if not bidirectional:
            inputs.pop("token_type_ids", None)
        return self.model(**inputs).logits[0, -1].float().log_softmax(-1)
