"""Tiny vision-language checkpoints (Qwen2.5-VL, Qwen3-VL; Gemma 3 in tiny_gemma3_vision.py) with random weights, the real image processor settings and
a chat template that renders image parts as the real one does, built offline for tests.

Apart from tiny_model.py because such a checkpoint has more parts: a vision tower, the processor's
preprocessor_config.json, and the vision special tokens added to the byte-level tokenizer."""
from __future__ import annotations

import os

from asyncserve.checkpoints.scratch import scratch_dir
from asyncserve.testing.tiny_model import (
    _SHARED_SHAPE,
    _init_weights,
    _special_token_ids,
    _update_json,
    _write_json,
    build_tokenizer,
)

VISION_FAMILIES = ("qwen2_5_vl", "qwen3_vl", "gemma3")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL's chat template, shortened: an image part (type "image" or "image_url", or a key "image")
# renders as <|vision_start|><|image_pad|><|vision_end|>, text parts as their text.
QWEN_VL_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen2.5-VL-7B's vision tower (depth 32, width 1280, 16 heads, windows of 112 pixels, full attention in
# blocks 7/15/23/31, 14-pixel patches merged 2x2) scaled down: 2 blocks, the second with full attention.
_TINY_VISION = {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64,
                "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                "fullatt_block_indexes": [1], "hidden_act": "silu", "tokens_per_second": 2, "in_channels": 3}
# Qwen2.5-VL's preprocessor_config.json as published (min/max pixels, CLIP's mean and std).
PREPROCESSOR_CONFIG = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}

# Qwen3-VL-8B's vision tower (depth 27, width 1152, 16 heads, 16-pixel patches merged 2x2, a 48x48 learned
# position grid, DeepStack after blocks 8/16/24 into the first 3 of 36 decoder layers) scaled down: 3 blocks,
# an 8x8 grid, DeepStack after blocks 0 and 1 into the first 2 of 3 decoder layers.
_TINY_QWEN3_VISION = {"depth": 3, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48,
                      "out_hidden_size": 64, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1],
                      "hidden_act": "gelu_pytorch_tanh", "in_channels": 3}
# Qwen3-VL's preprocessor_config.json as published (65536 to 16777216 pixels, mean and std 0.5).
QWEN3_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
}
# model_type, architecture, vision config, preprocessor config, text config beside the shared shape
# (Qwen3-VL: interleaved M-RoPE, a 16-wide head's 8 frequencies split 4/2/2 as the real 64 split 24/20/20).
_QWEN_FAMILIES = {
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _TINY_VISION, PREPROCESSOR_CONFIG,
                   {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
                    "use_sliding_window": False, "sliding_window": None}),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLForConditionalGeneration", _TINY_QWEN3_VISION, QWEN3_PREPROCESSOR_CONFIG,
                 {"rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [4, 2, 2],
                                      "mrope_interleaved": True},
                  "num_hidden_layers": 3, "attention_bias": False}),
}


def _write_checkpoint(out_dir: str, seed: int, text_overrides: dict, family: str = "qwen2_5_vl") -> None:
    import torch
    import transformers
    from transformers import AutoConfig, GenerationConfig
    from transformers.utils import logging as hf_logging

    model_type, architecture, vision, preprocessor, text_config = _QWEN_FAMILIES[family]

    tokenizer = build_tokenizer("byte_level")
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    ids = _special_token_ids(tokenizer, "byte_level")
    vision_start, vision_end, image_pad, video_pad = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
    text = {**_SHARED_SHAPE, "vocab_size": len(tokenizer), "bos_token_id": ids["bos_token_id"],
            "eos_token_id": ids["eos_token_id"][0], **text_config, **text_overrides}
    text.pop("rope_scaling")
    if family == "qwen2_5_vl":
        text.pop("head_dim")  # Qwen2.5-VL's text model computes it (64 / 4 = 16)
    config = AutoConfig.for_model(model_type, text_config=text, vision_config=dict(vision),
                                  image_token_id=image_pad, video_token_id=video_pad,
                                  vision_start_token_id=vision_start, vision_end_token_id=vision_end,
                                  tie_word_embeddings=False)
    config.architectures = [architecture]
    with torch.random.fork_rng(devices=[]):
        model = getattr(transformers, architecture)(config).to(torch.float32)
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(**ids)
    progress_bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
    finally:
        if progress_bars:
            hf_logging.enable_progress_bar()
    tokenizer.save_pretrained(out_dir)
    _update_json(os.path.join(out_dir, "tokenizer_config.json"),
                 tokenizer_class="PreTrainedTokenizerFast", chat_template=QWEN_VL_TEMPLATE)
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), preprocessor)


def build_tiny_vision_checkpoint(path, family: str = "qwen2_5_vl", *, seed: int = 0, **text_overrides) -> str:
    """Writes a complete checkpoint of a vision-language `family` at `path` (built beside it, then renamed)."""
    if family not in VISION_FAMILIES:
        raise ValueError(f"unknown vision family {family!r}; choose one of {VISION_FAMILIES}")
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path) and os.listdir(path):
        raise FileExistsError(f"{path} exists and is not empty; remove it or choose another path")
    parent, name = os.path.split(path)
    with scratch_dir(parent, name) as staging:
        os.chmod(staging, 0o755)
        if family == "gemma3":
            from asyncserve.testing.tiny_gemma3_vision import write_gemma3_checkpoint
            write_gemma3_checkpoint(staging, seed, text_overrides)
        else:
            _write_checkpoint(staging, seed, text_overrides, family)
        os.rename(staging, path)
    return path
