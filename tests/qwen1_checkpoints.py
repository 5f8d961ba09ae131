"""Tiny Qwen-1 checkpoints for tests. transformers has no Qwen-1 class, so the reference is a tiny Qwen2
(transformers' own, qkv bias like Qwen-1, one KV head per head) whose weights are written again under
Qwen-1's names, with a Qwen-1 config.json and a qwen.tiktoken made from the tiny byte-level BPE vocabulary.

Written from Qwen-1's published files (config.json, tokenization_qwen.py, modeling_qwen.py), not from
asyncserve's code: Qwen-1's MLP is c_proj(w1(x) * silu(w2(x))), so w2 holds Qwen2's gate_proj and w1 its
up_proj; c_attn is q|k|v stacked.
"""
from __future__ import annotations

import base64
import json
import os

import torch
from safetensors.torch import load_file, save_file

from asyncserve.testing.tiny_model import build_tiny_checkpoint, build_tokenizer
from tests.checkpoint_edits import copy_checkpoint
from tests.quantized_checkpoints import build_quantized

# tokenization_qwen.py's PAT_STR and special tokens (copied here so that a wrong copy in asyncserve fails).
QWEN_PAT_STR = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
QWEN1_LINEAR_MODULES = ("c_attn", "c_proj", "w1", "w2")

HIDDEN, HEADS, HEAD_DIM, MLP_WIDTH, VOCAB = 128, 4, 32, 128, 1024  # group 128 fits every GPTQ input
SEQ_LENGTH = 1024  # below max_position_embeddings (2048), as Qwen-14B's 2048 is below its 8192


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted (as in openai/gpt-2's encoder.py)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte not in printable:
            chars[byte] = chr(256 + extra)
            extra += 1
        else:
            chars[byte] = chr(byte)
    return {char: byte for byte, char in chars.items()}


def write_tiktoken(path: str) -> int:
    """qwen.tiktoken from the tiny byte-level BPE: its tokens as bytes, ranked in id order; returns the
    number of ranks (the first special token's id)."""
    decoder = _byte_decoder()
    vocab = build_tokenizer("byte_level").get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])
              if token not in QWEN_SPECIAL_TOKENS]
    with open(path, "w") as f:
        for rank, token in enumerate(tokens):
            f.write(f"{base64.b64encode(bytes(decoder[c] for c in token)).decode()} {rank}\n")
    return len(tokens)


def qwen2_to_qwen1(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": weights["model.embed_tokens.weight"],
           "transformer.ln_f.weight": weights["model.norm.weight"], "lm_head.weight": weights["lm_head.weight"]}
    layers = {int(name.split(".")[2]) for name in weights if name.startswith("model.layers.")}
    for i in layers:
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        attn = src + "self_attn."
        for kind in ("weight", "bias"):
            out[dst + f"attn.c_attn.{kind}"] = torch.cat([weights[attn + f"{p}_proj.{kind}"] for p in "qkv"])
        out[dst + "attn.c_proj.weight"] = weights[attn + "o_proj.weight"]
        out[dst + "ln_1.weight"] = weights[src + "input_layernorm.weight"]
        out[dst + "ln_2.weight"] = weights[src + "post_attention_layernorm.weight"]
        out[dst + "mlp.w2.weight"] = weights[src + "mlp.gate_proj.weight"]
        out[dst + "mlp.w1.weight"] = weights[src + "mlp.up_proj.weight"]
        out[dst + "mlp.c_proj.weight"] = weights[src + "mlp.down_proj.weight"]
    return out


def qwen1_to_qwen2(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": weights["transformer.wte.weight"],
           "model.norm.weight": weights["transformer.ln_f.weight"], "lm_head.weight": weights["lm_head.weight"]}
    layers = {int(name.split(".")[2]) for name in weights if name.startswith("transformer.h.")}
    for i in layers:
        src, dst = f"transformer.h.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            for p, part in zip("qkv", weights[src + f"attn.c_attn.{kind}"].chunk(3)):
                out[dst + f"self_attn.{p}_proj.{kind}"] = part.clone()
        out[dst + "self_attn.o_proj.weight"] = weights[src + "attn.c_proj.weight"]
        out[dst + "input_layernorm.weight"] = weights[src + "ln_1.weight"]
        out[dst + "post_attention_layernorm.weight"] = weights[src + "ln_2.weight"]
        out[dst + "mlp.gate_proj.weight"] = weights[src + "mlp.w2.weight"]
        out[dst + "mlp.up_proj.weight"] = weights[src + "mlp.w1.weight"]
        out[dst + "mlp.down_proj.weight"] = weights[src + "mlp.c_proj.weight"]
    return out


def _weights(path: str) -> dict[str, torch.Tensor]:
    weights = {}
    for name in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        weights.update(load_file(os.path.join(path, name)))
    return weights


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


# Remote code a Qwen-1 checkpoint ships: importing any of it must never happen.
_REMOTE_CODE = "raise RuntimeError('the checkpoint\\'s remote code was executed')\n"


def build_qwen1(root) -> tuple[str, str]:
    """(Qwen-1 checkpoint, Qwen2 reference checkpoint with the same weights) under `root`."""
    root = os.fspath(root)
    reference = build_tiny_checkpoint(
        os.path.join(root, "qwen2-reference"), "qwen2", hidden_size=HIDDEN, num_attention_heads=HEADS,
        num_key_value_heads=HEADS, head_dim=HEAD_DIM, intermediate_size=MLP_WIDTH, vocab_size=VOCAB,
        tie_word_embeddings=False)
    path = os.path.join(root, "qwen1")
    os.makedirs(path)
    num_ranks = write_tiktoken(os.path.join(path, "qwen.tiktoken"))
    end_of_text, im_end = num_ranks, num_ranks + 2
    with open(os.path.join(reference, "config.json")) as f:
        rope_theta = json.load(f)["rope_theta"]
    _write_json(os.path.join(path, "config.json"), {
        "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "hidden_size": HIDDEN, "intermediate_size": 2 * MLP_WIDTH, "kv_channels": HEAD_DIM,
        "num_attention_heads": HEADS, "num_hidden_layers": 2, "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 2048, "seq_length": SEQ_LENGTH, "rotary_emb_base": rope_theta,
        "rotary_pct": 1.0, "no_bias": True, "tie_word_embeddings": False, "use_dynamic_ntk": True,
        "use_logn_attn": True, "use_flash_attn": "auto", "vocab_size": VOCAB, "bf16": False, "fp16": False,
        "fp32": False, "scale_attn_weights": True, "tokenizer_class": "QWenTokenizer"})
    _write_json(os.path.join(path, "generation_config.json"), {
        "chat_format": "chatml", "eos_token_id": end_of_text, "pad_token_id": end_of_text,
        "stop_words_ids": [[end_of_text]], "max_window_size": 6144, "max_new_tokens": 512})
    _write_json(os.path.join(path, "tokenizer_config.json"), {
        "model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}})
    for name in ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py"):
        with open(os.path.join(path, name), "w") as f:
            f.write(_REMOTE_CODE)
    save_file({name: tensor.contiguous() for name, tensor in qwen2_to_qwen1(_weights(reference)).items()},
              os.path.join(path, "model.safetensors"))
    # The reference stops where Qwen-1's chat does: <|endoftext|> or <|im_end|>, in Qwen-1's numbering.
    _write_json(os.path.join(reference, "generation_config.json"), {
        "eos_token_id": [end_of_text, im_end], "pad_token_id": end_of_text, "bos_token_id": end_of_text})
    return path, reference


# quantize_config.json as Qwen-14B-Chat-Int4 ships it.
QWEN_INT4_QUANTIZE_CONFIG = {"bits": 4, "group_size": 128, "damp_percent": 0.01, "desc_act": False,
                             "static_groups": False, "sym": True, "true_sequential": True,
                             "model_name_or_path": None, "model_file_base_name": "model"}


def build_qwen1_gptq(qwen1: str, reference: str, root) -> tuple[str, str]:
    """(Qwen-1 GPTQ checkpoint in Qwen-14B-Chat-Int4's layout, Qwen2 reference of its dequantized weights)."""
    root = os.fspath(root)
    quantized, dequantized = build_quantized(qwen1, os.path.join(root, "qwen1-gptq"), "gptq", bits=4,
                                             group_size=128, sym=True, config_file=True,
                                             linear_modules=QWEN1_LINEAR_MODULES)
    _write_json(os.path.join(quantized, "quantize_config.json"), QWEN_INT4_QUANTIZE_CONFIG)
    weights = qwen1_to_qwen2(_weights(dequantized))
    return quantized, copy_checkpoint(reference, os.path.join(root, "qwen2-gptq-reference"), None, weights)
