"""Servable random-weight model directories: a real config plus a word-level tokenizer of one token per id.

    python scripts/bench_models.py llama-3.1-8b --out /tmp/llama-3.1-8b
    asyncserve --model /tmp/llama-3.1-8b --load-format dummy      # or: vllm serve /tmp/llama-3.1-8b --load-format dummy

Token id i is the word "t<i>", so any id sequence decodes to text and that text encodes back to the same ids:
a benchmark's random prompts are exact in ids or in text, and outputs are detokenized for real (the serving
cost users pay), without downloading a checkpoint. The tokenizer is built with Hugging Face `tokenizers`, so
transformers, asyncserve and vLLM all load it as a plain fast tokenizer.

A vision-language config (Qwen2.5-VL, Qwen3-VL) also gets its image special tokens under their real names at
their ids (so "<|vision_start|><|image_pad|><|vision_end|>" in a prompt is those three tokens, as every
engine's processor expects), the image processor's preprocessor_config.json from beside the config, and a chat
template that renders an image part as those tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
CHAT_TEMPLATE = "{%- for message in messages %}{{- message['content'] + ' ' }}{%- endfor %}"
# Qwen's vision tokens by the config field that holds each one's id.
QWEN_VISION_TOKENS = {"vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
                      "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}
VISION_CHAT_TEMPLATE = (
    "{%- for message in messages %}{%- if message['content'] is string %}{{- message['content'] + ' ' }}"
    "{%- else %}{%- for part in message['content'] %}{%- if part['type'] == 'text' %}{{- part['text'] + ' ' }}"
    "{%- else %}{{- '<|vision_start|><|image_pad|><|vision_end|> ' }}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- endfor %}")


def token(i: int) -> str:
    return f"t{i}"


def build_tokenizer(vocab_size: int, special: dict[int, str] | None = None):
    """WordLevel over "t0".."t<vocab_size-1>", split on whitespace, decoded by joining with spaces; the ids
    of `special` are those special tokens instead."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    special = special or {}
    vocab = {special.get(i, token(i)): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=token(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # " ".join, and " tN" per streamed token
    if special:
        tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in special.values()])
    return tokenizer


def vision_tokens(config: dict) -> dict[int, str]:
    """{id: name} of a Qwen vision-language config's image special tokens; {} for any other config."""
    if not config.get("model_type", "").startswith(("qwen2_vl", "qwen2_5_vl", "qwen3_vl")):
        return {}
    return {config[field]: name for field, name in QWEN_VISION_TOKENS.items() if field in config}


def _first(value):
    return value[0] if isinstance(value, list) else value


def write_model_dir(config: dict, out_dir: str, preprocessor_config: str | None = None) -> str:
    """Writes config.json, tokenizer.json and tokenizer_config.json for `config` into `out_dir` (and a
    copy of `preprocessor_config`, a vision model's image processor settings)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    special = vision_tokens(config)
    build_tokenizer(config["vocab_size"], special).save(os.path.join(out_dir, "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                        "model_max_length": config.get("max_position_embeddings", 4096),
                        "chat_template": VISION_CHAT_TEMPLATE if special else CHAT_TEMPLATE}
    if preprocessor_config is not None:
        shutil.copyfile(preprocessor_config, os.path.join(out_dir, "preprocessor_config.json"))
    for name in ("bos", "eos", "pad"):
        token_id = _first(config.get(f"{name}_token_id"))
        if token_id is not None and token_id < config["vocab_size"]:
            tokenizer_config[f"{name}_token"] = token(token_id)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    return out_dir


def _config_path(name: str) -> str:
    path = os.path.join(CONFIG_DIR, name) if os.path.isdir(os.path.join(CONFIG_DIR, name)) else name
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


def load_config(name: str) -> dict:
    """A config from scripts/model_configs by name, or from a config.json path / model directory."""
    with open(_config_path(name)) as f:
        return json.load(f)


def model_dir(name: str, out_dir: str) -> str:
    """The servable directory for `name` under `out_dir`, written once (the tokenizer is kept if present)."""
    config = load_config(name)
    if os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        with open(os.path.join(out_dir, "config.json")) as f:
            if json.load(f) == config:
                return out_dir
    preprocessor = os.path.join(os.path.dirname(_config_path(name)), "preprocessor_config.json")
    return write_model_dir(config, out_dir, preprocessor if os.path.isfile(preprocessor) else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"one of {sorted(os.listdir(CONFIG_DIR))}, or a config.json path")
    parser.add_argument("--out", required=True, help="directory to write")
    args = parser.parse_args(argv)
    print(model_dir(args.name, args.out))


if __name__ == "__main__":
    main()
