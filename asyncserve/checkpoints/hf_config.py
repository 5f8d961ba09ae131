"""A checkpoint's architecture config: transformers' reading of config.json, or asyncserve's own for Qwen-1."""
from __future__ import annotations

import logging

logger = logging.getLogger("asyncserve")


def load_hf_config(path: str):
    """transformers' config of the checkpoint, or asyncserve's own reading of a Qwen-1 config.json,
    whose class exists only as the checkpoint's remote code (never run)."""
    from asyncserve.checkpoints.qwen_config import QWenConfig, is_qwen1, read_config_json
    config = read_config_json(path)
    if is_qwen1(config):
        logger.info("Qwen-1 checkpoint (model_type 'qwen'): its remote code is not run, trust_remote_code or "
                    "not; asyncserve serves it with its own QWenLMHeadModel and reads qwen.tiktoken with tiktoken.")
        return QWenConfig.from_dict(config, path)
    from transformers import AutoConfig
    return text_part(AutoConfig.from_pretrained(path))


def text_part(config):
    """A multimodal checkpoint's text-model config (`text_config`: Qwen3.5's), which is what asyncserve
    serves of it, with the checkpoint's architecture and the top level's settings the text part lacks; any
    other config as it is."""
    text = getattr(config, "text_config", None)
    if text is None or hasattr(config, "vocab_size"):
        return config
    text.architectures = list(getattr(config, "architectures", None) or [])
    for name in ("tie_word_embeddings", "dtype"):
        if getattr(text, name, None) in (None, False) and getattr(config, name, None) is not None:
            setattr(text, name, getattr(config, name))
    # What a family that serves images reads besides the text part: its vision tower and special tokens.
    for name in _VISION_FIELDS:
        if getattr(config, name, None) is not None:
            setattr(text, name, getattr(config, name))
    logger.info("reading the text part of a multimodal checkpoint (%s); its vision encoder is loaded only "
                "by families that serve images", ", ".join(text.architectures) or config.model_type)
    return text


_VISION_FIELDS = ("vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
                  "vision_end_token_id", "mm_tokens_per_image", "boi_token_id", "eoi_token_id")
