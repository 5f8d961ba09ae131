"""config.json of Qwen-1 (`model_type: "qwen"`, QWenLMHeadModel) read without its remote code:
transformers has no class for it, and asyncserve never runs a checkpoint's code."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

from asyncserve.errors import ConfigError

MODEL_TYPE = "qwen"
# configuration_qwen.py's defaults, for keys a config.json leaves out.
_DEFAULTS = {
    "vocab_size": 151936, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "kv_channels": 128, "rotary_pct": 1.0,
    "rotary_emb_base": 10000, "use_dynamic_ntk": True, "use_logn_attn": True, "intermediate_size": 22016,
    "no_bias": True, "tie_word_embeddings": False, "bf16": False, "fp16": False, "fp32": False,
}


class QWenConfig(SimpleNamespace):
    """Every key of config.json as an attribute, Qwen's defaults for the missing ones, plus what the
    rest of asyncserve reads of a config: `torch_dtype` (from Qwen's bf16/fp16/fp32 flags) and the
    EOS ids (<|endoftext|> and ChatML's <|im_end|>, which follow the ranks of qwen.tiktoken).

    `seq_length` (its training length) caps max_model_len: Qwen-1 reaches past it only with dynamic NTK
    rotary scaling and log-n attention scaling, which asyncserve does not implement; within it both are
    inactive (NTK alpha is 1, log-n factors are 1), so nothing changes there."""

    def __init__(self, **entries):
        super().__init__(**{**_DEFAULTS, **entries})
        self.seq_length = entries.get("seq_length", self.max_position_embeddings)
        if getattr(self, "torch_dtype", None) is None:
            flags = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
            self.torch_dtype = next((dtype for flag, dtype in flags.items() if getattr(self, flag)), None)
        if self.rotary_pct != 1.0:
            raise ConfigError(f"rotary_pct={self.rotary_pct} in config.json: asyncserve's Qwen-1 applies rotary "
                              "embeddings to the whole head (rotary_pct=1.0), as every released Qwen-1 does.")
        if self.kv_channels * self.num_attention_heads != self.hidden_size:
            raise ConfigError(f"kv_channels x num_attention_heads ({self.kv_channels} x "
                              f"{self.num_attention_heads}) must equal hidden_size ({self.hidden_size}).")

    @classmethod
    def from_dict(cls, config: dict, path: str | None = None) -> "QWenConfig":
        config = dict(config)
        tiktoken_file = os.path.join(path, "qwen.tiktoken") if path else None
        if "eos_token_id" not in config and tiktoken_file and os.path.exists(tiktoken_file):
            from asyncserve.checkpoints.qwen_tokenizer import ENDOFTEXT, IM_END, special_token_ids
            ids = special_token_ids(tiktoken_file)
            config["eos_token_id"] = [ids[ENDOFTEXT], ids[IM_END]]
        return cls(**config)


def read_config_json(path: str) -> dict | None:
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def is_qwen1(config: dict | None) -> bool:
    return bool(config) and config.get("model_type") == MODEL_TYPE
