"""Tiny GGUF files written with `gguf.GGUFWriter` from tiny transformers checkpoints, as llama.cpp's
convert_hf_to_gguf.py lays them out (q/k rows permuted for llama, tied embeddings without output.weight).

K-quant blocks (Q4_K, Q5_K, Q6_K) are random bytes with sane scales, since gguf-py cannot quantize to
them; every loader under test reads the same file, so they must agree on it.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
# Row length 256 everywhere: K-quant blocks hold 256 values.
GGUF_SHAPE = {"hidden_size": 256, "intermediate_size": 256, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 64}

# Per layer, a type for each matrix: together they cover every type the converter claims.
LAYER_TYPES = [
    {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q5_0,
     "ffn_gate": Q.Q4_K, "ffn_up": Q.Q5_K, "ffn_down": Q.Q6_K},
    {"attn_q": Q.Q6_K, "attn_k": Q.Q5_K, "attn_v": Q.Q4_K, "attn_output": Q.Q5_1,
     "ffn_gate": Q.F16, "ffn_up": Q.BF16, "ffn_down": Q.F32},
]
_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
             "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
             "attn_k_norm": "self_attn.k_norm"}
# K-quant block layout: (bytes per 256 values, offsets of the float16 scales, their value)
_K_BLOCKS = {Q.Q4_K: (144, {0: 0.001, 2: 0.004}), Q.Q5_K: (176, {0: 0.0005, 2: 0.004}),
             Q.Q6_K: (210, {208: 0.0002})}


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` of q/k rows (convert_hf_to_gguf.py)."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def llama_cpp_rope_factors(config: dict, scaling: dict) -> np.ndarray:
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py computes them for Llama 3.1 rope scaling."""
    base, dim = config["rope_theta"], config["head_dim"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = 8192  # llama.cpp reads a top-level original_max_position_embeddings, absent in 3.1
    factors = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high:
            factors.append(1.0)
        elif wavelen > old_context_len / low:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _random_k_blocks(rows: int, cols: int, qtype, rng) -> np.ndarray:
    block_bytes, scales = _K_BLOCKS[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, block_bytes), dtype=np.uint8)
    for offset, value in scales.items():
        blocks[:, offset:offset + 2] = np.full((len(blocks), 1), value, np.float16).view(np.uint8)
    return blocks.reshape(rows, cols // 256 * block_bytes)


def _add(writer: GGUFWriter, name: str, weight: np.ndarray, qtype, rng) -> None:
    if qtype == Q.F32:
        writer.add_tensor(name, weight.astype(np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, weight.astype(np.float16))
    elif qtype in _K_BLOCKS:
        writer.add_tensor(name, _random_k_blocks(*weight.shape, qtype, rng), raw_dtype=qtype)
    else:
        writer.add_tensor(name, quantize(weight.astype(np.float32), qtype), raw_dtype=qtype)


def _add_tokenizer(writer: GGUFWriter, hf_dir: str, pre: str, add_bos: bool) -> None:
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    vocab = dict(spec["model"]["vocab"])
    for added in spec["added_tokens"]:
        vocab[added["content"]] = added["id"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in spec["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges(merges)
    with open(os.path.join(hf_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    writer.add_eos_token_id(vocab[tokenizer_config["eos_token"]])
    writer.add_pad_token_id(vocab[tokenizer_config["pad_token"]])
    writer.add_add_bos_token(add_bos)
    if add_bos:
        writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(tokenizer_config["chat_template"])


def _add_sentencepiece_tokenizer(writer: GGUFWriter, hf_dir: str) -> None:
    """A Llama-2-style vocabulary as llama.cpp stores it: pieces, scores (merge order), token types."""
    with open(os.path.join(hf_dir, "tokenizer.json"), encoding="utf-8") as f:
        vocab = json.load(f)["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0 if token.startswith("<") else -float(index) for index, token in enumerate(tokens)])
    writer.add_token_types([2 if token == "<unk>" else 3 if token in ("<s>", "</s>")
                            else 6 if token.startswith("<0x") else 1 for token in tokens])
    writer.add_unk_token_id(vocab["<unk>"])
    writer.add_bos_token_id(vocab["<s>"])
    writer.add_eos_token_id(vocab["</s>"])
    writer.add_add_bos_token(True)
    with open(os.path.join(hf_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        writer.add_chat_template(json.load(f)["chat_template"])


def write_gguf(hf_dir: str, out_path: str, family: str, *, tokenizer_pre: str | None = "qwen2",
               add_bos: bool = False, seed: int = 0) -> str:
    """`tokenizer_pre`: a byte-level BPE pre-tokenizer name, "sentencepiece", or None (no tokenizer)."""
    # Writes `hf_dir`'s tiny checkpoint as a GGUF of mixed quantization types; returns its path.
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    arch = GGUF_ARCH[family]
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(out_path, arch)
    writer.add_name(f"tiny {family}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if tokenizer_pre == "sentencepiece":
        _add_sentencepiece_tokenizer(writer, hf_dir)
    elif tokenizer_pre is not None:
        _add_tokenizer(writer, hf_dir, tokenizer_pre, add_bos)

    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":  # llama.cpp's LlamaModel.generate_extra_tensors
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors(config, scaling))
    writer.add_tensor("token_embd.weight", quantize(weights["model.embed_tokens.weight"], Q.Q8_0),
                      raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if "lm_head.weight" in weights and not config.get("tie_word_embeddings"):
        _add(writer, "output.weight", weights["lm_head.weight"], Q.Q6_K, rng)
    for layer, types in zip(range(config["num_hidden_layers"]), LAYER_TYPES):
        prefix = f"model.layers.{layer}."
        for short in ("attn_norm", "ffn_norm", "attn_q_norm", "attn_k_norm"):
            if prefix + _HF_NAMES[short] + ".weight" in weights:
                writer.add_tensor(f"blk.{layer}.{short}.weight", weights[prefix + _HF_NAMES[short] + ".weight"])
        for short, qtype in types.items():
            weight = weights[prefix + _HF_NAMES[short] + ".weight"]
            bias = weights.get(prefix + _HF_NAMES[short] + ".bias")
            if arch == "llama" and short in ("attn_q", "attn_k"):
                heads = config["num_attention_heads" if short == "attn_q" else "num_key_value_heads"]
                weight = llama_cpp_permute(weight, heads)
            _add(writer, f"blk.{layer}.{short}.weight", weight, qtype, rng)
            if bias is not None:
                writer.add_tensor(f"blk.{layer}.{short}.bias", bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
