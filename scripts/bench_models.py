"""Servable random-weight model directories: a real config plus a word-level tokenizer of one token per id.

    python scripts/bench_models.py llama-3.1-8b --out /tmp/llama-3.1-8b
    asyncserve --model /tmp/llama-3.1-8b --load-format dummy      # or: vllm serve /tmp/llama-3.1-8b --load-format dummy

Token id i is the word "t<i>", so any id sequence decodes to text and that text encodes back to the same ids:
a benchmark's random prompts are exact in ids or in text, and outputs are detokenized for real (the serving
cost users pay), without downloading a checkpoint. The tokenizer is built with Hugging Face `tokenizers`, so
transformers, asyncserve and vLLM all load it as a plain fast tokenizer.
"""
from __future__ import annotations

import argparse
import json
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")
CHAT_TEMPLATE = "{%- for message in messages %}{{- message['content'] + ' ' }}{%- endfor %}"


def token(i: int) -> str:
    return f"t{i}"


def build_tokenizer(vocab_size: int):
    """WordLevel over "t0".."t<vocab_size-1>", split on whitespace, decoded by joining with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tokenizer = Tokenizer(models.WordLevel({token(i): i for i in range(vocab_size)}, unk_token=token(0)))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # " ".join, and " tN" per streamed token
    return tokenizer


def _first(value):
    return value[0] if isinstance(value, list) else value


def write_model_dir(config: dict, out_dir: str) -> str:
    """Writes config.json, tokenizer.json and tokenizer_config.json for `config` into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    build_tokenizer(config["vocab_size"]).save(os.path.join(out_dir, "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                        "model_max_length": config.get("max_position_embeddings", 4096),
                        "chat_template": CHAT_TEMPLATE}
    for name in ("bos", "eos", "pad"):
        token_id = _first(config.get(f"{name}_token_id"))
        if token_id is not None and token_id < config["vocab_size"]:
            tokenizer_config[f"{name}_token"] = token(token_id)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    return out_dir


def load_config(name: str) -> dict:
    """A config from scripts/model_configs by name, or from a config.json path / model directory."""
    path = os.path.join(CONFIG_DIR, name) if os.path.isdir(os.path.join(CONFIG_DIR, name)) else name
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    with open(path) as f:
        return json.load(f)


def model_dir(name: str, out_dir: str) -> str:
    """The servable directory for `name` under `out_dir`, written once (the tokenizer is kept if present)."""
    config = load_config(name)
    if os.path.exists(os.path.join(out_dir, "tokenizer_config.json")):
        with open(os.path.join(out_dir, "config.json")) as f:
            if json.load(f) == config:
                return out_dir
    return write_model_dir(config, out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help=f"one of {sorted(os.listdir(CONFIG_DIR))}, or a config.json path")
    parser.add_argument("--out", required=True, help="directory to write")
    args = parser.parse_args(argv)
    print(model_dir(args.name, args.out))


if __name__ == "__main__":
    main()
