"""A checkpoint's tokenizer: transformers' for every family, asyncserve's own tiktoken reader for Qwen-1."""
from __future__ import annotations


def load_tokenizer(model_config):
    """The tokenizer of `--tokenizer` if given, else the checkpoint's own."""
    from asyncserve.checkpoints.qwen_tokenizer import QWenTokenizer, is_qwen_tokenizer_dir
    path = model_config.tokenizer or model_config.path
    if is_qwen_tokenizer_dir(path):
        return QWenTokenizer.from_directory(path)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
