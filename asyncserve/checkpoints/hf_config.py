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
    return AutoConfig.from_pretrained(path)
