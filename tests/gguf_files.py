"""Tiny GGUF files written with `gguf.GGUFWriter` from tiny transformers checkpoints, as llama.cpp's
convert_hf_to_gguf.py lays them out (q/k rows permuted for llama, Gemma's norms stored as 1 + w, Phi-3's
LongRoPE factors as tensors, tied embeddings without output.weight).

K-quant blocks (Q4_K, Q5_K, Q6_K) are random bytes with sane scales, since gguf-py cannot quantize to
them; every loader under test reads the same file, so they must agree on it.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFWriter, RopeScalingType
from gguf.quants import quantize
from safetensors.numpy import load_file

GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
             "gemma3": "gemma3", "phi3": "phi3"}
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
# Per architecture, where its names differ from the llama layout above.
_ARCH_NAMES = {
    "gemma2": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},  # fused, as in the checkpoint
}
_ARCH_NAMES["gemma3"] = _ARCH_NAMES["gemma2"]
_NORMS = ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm")
_NORM_SHIFT = {"gemma2": 1.0, "gemma3": 1.0}  # llama.cpp's Gemma converters store norm weights as 1 + w
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
    if tokenizer_config.get("chat_template"):
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


def _rope(config: dict) -> tuple[float, dict]:
    """(theta, scaling) of the (global) layers, from either form of config.json (4.x or 5)."""
    params = config.get("rope_parameters") or {}
    params = params.get("full_attention", params)
    scaling = {**params, **(config.get("rope_scaling") or {})}
    scaling["rope_type"] = {"su": "longrope"}.get(scaling.get("type"), scaling.get("rope_type", "default"))
    return config.get("rope_theta") or scaling["rope_theta"], scaling


def _add_arch_metadata(writer: GGUFWriter, arch: str, config: dict, scaling: dict, head_dim: int) -> None:
    """What llama.cpp's converter writes beyond the shared fields, per architecture."""
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if config.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(config["final_logit_softcapping"])
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        if scaling["rope_type"] == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(scaling["factor"])
    elif arch == "phi3":  # llama.cpp's Phi3MiniModel
        original = config.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_sliding_window(config.get("sliding_window") or 0)
        if scaling["rope_type"] == "longrope":
            scale = config["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
            writer.add_tensor("rope_factors_long.weight", np.array(scaling["long_factor"], np.float32))
            writer.add_tensor("rope_factors_short.weight", np.array(scaling["short_factor"], np.float32))


def write_gguf(hf_dir: str, out_path: str, family: str, *, tokenizer_pre: str | None = "qwen2",
               add_bos: bool = False, seed: int = 0, float_only: bool = False) -> str:
    """`tokenizer_pre`: a byte-level BPE pre-tokenizer name, "sentencepiece", or None (no tokenizer).
    `float_only`: every tensor F32, so the file holds the checkpoint's exact values."""
    # Writes `hf_dir`'s tiny checkpoint as a GGUF of mixed quantization types; returns its path.
    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    weights = load_file(os.path.join(hf_dir, "model.safetensors"))
    arch = GGUF_ARCH[family]
    names = {**_HF_NAMES, **_ARCH_NAMES.get(arch, {})}
    shift = np.float32(_NORM_SHIFT.get(arch, 0.0))
    theta, scaling = _rope(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    partial = config.get("partial_rotary_factor") or scaling.get("partial_rotary_factor") or 1.0
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
    if arch != "phi3":  # Phi-3's head width is hidden / heads; its rope width may be less
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(partial * head_dim))
    writer.add_rope_freq_base(theta)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    _add_arch_metadata(writer, arch, config, scaling, head_dim)
    if tokenizer_pre == "sentencepiece":
        _add_sentencepiece_tokenizer(writer, hf_dir)
    elif tokenizer_pre is not None:
        _add_tokenizer(writer, hf_dir, tokenizer_pre, add_bos)

    if scaling["rope_type"] == "llama3":  # llama.cpp's LlamaModel.generate_extra_tensors
        writer.add_tensor("rope_freqs.weight", llama_cpp_rope_factors({**config, "rope_theta": theta}, scaling))
    embedding = weights["model.embed_tokens.weight"]
    if float_only:
        writer.add_tensor("token_embd.weight", embedding)
    else:
        writer.add_tensor("token_embd.weight", quantize(embedding, Q.Q8_0), raw_dtype=Q.Q8_0)
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"] + shift)
    if "lm_head.weight" in weights and not config.get("tie_word_embeddings"):
        _add(writer, "output.weight", weights["lm_head.weight"], Q.F32 if float_only else Q.Q6_K, rng)
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        for short in _NORMS:
            if short in names and prefix + names[short] + ".weight" in weights:
                writer.add_tensor(f"blk.{layer}.{short}.weight", weights[prefix + names[short] + ".weight"] + shift)
        for short, qtype in _layer_types(arch, layer).items():
            weight = weights[prefix + names[short] + ".weight"]
            bias = weights.get(prefix + names[short] + ".bias")
            if arch == "llama" and short in ("attn_q", "attn_k"):
                heads = config["num_attention_heads" if short == "attn_q" else "num_key_value_heads"]
                weight = llama_cpp_permute(weight, heads)
            _add(writer, f"blk.{layer}.{short}.weight", weight, Q.F32 if float_only else qtype, rng)
            if bias is not None:
                writer.add_tensor(f"blk.{layer}.{short}.bias", bias)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def _layer_types(arch: str, layer: int) -> dict:
    """The matrices of `layer` and their types (LAYER_TYPES in turn; Phi-3's fused tensors take q's and gate's)."""
    types = LAYER_TYPES[layer % len(LAYER_TYPES)]
    if arch != "phi3":
        return types
    return {"attn_qkv": types["attn_q"], "attn_output": types["attn_output"], "ffn_up": types["ffn_gate"],
            "ffn_down": types["ffn_down"]}
