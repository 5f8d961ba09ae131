"""GGUF files (llama.cpp's format) turned into Hugging Face checkpoint directories, dequantized once.

The engine loads Hugging Face directories; a GGUF file is converted into one the first time it is
served (weights dequantized to the serving dtype with `gguf`, llama.cpp's own reader, into sharded
safetensors; config and tokenizer rebuilt from the metadata) and cached under the asyncserve cache
dir, keyed by the file's path, size and modification time and the dtype.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil

import numpy as np

from asyncserve.errors import ConfigError, UnsupportedModelError
from asyncserve.paths import cache_dir
from asyncserve.scratch import scratch_dir

logger = logging.getLogger("asyncserve")

SHARD_BYTES = 2 << 30  # largest safetensors file written
CONVERTER_VERSION = 1  # bump when the conversion's output changes: cached directories are rebuilt
MARKER_FILE = "asyncserve_gguf.json"  # written last: the directory is complete

# GGUF `general.architecture` -> (model_type, HF architecture, llama.cpp permuted q/k rows for rotary)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),  # Llama 1/2/3 and Mistral files alike say "llama"
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
# Tensor types dequantized at load (each checked against transformers' GGUF loading in tests/test_gguf.py).
QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}

# `tokenizer.ggml.pre` -> the split regex its merges were learned with (None: digits one by one).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_TOKENIZERS = {
    "smollm": "digits", "gpt-2": "gpt2", "default": "gpt2",
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _metadata(reader) -> dict:
    """Every scalar and string-array field as a Python value (arrays of numbers as lists)."""
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            # float32 fields read back as 9.999999747378752e-06: keep the value the writer meant
            out[key] = float(f"{value:.7g}") if isinstance(value, float) else value
    return out


def _check_supported(path: str, reader, meta: dict) -> str:
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF file {path!r} has architecture {arch!r}, which asyncserve does not serve. Supported GGUF "
            f"architectures: {', '.join(ARCHITECTURES)}.")
    unsupported = sorted({t.tensor_type.name for t in reader.tensors} - set(QUANT_TYPES))
    if unsupported:
        names = [t.name for t in reader.tensors if t.tensor_type.name in unsupported][:3]
        raise ConfigError(
            f"GGUF file {path!r} holds tensors of quantization type {', '.join(unsupported)} (e.g. "
            f"{', '.join(names)}), which asyncserve cannot dequantize yet. Supported types: "
            f"{', '.join(QUANT_TYPES)}.")
    return arch


def _llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                         high_freq_factor: float, original_max_position: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp stores as rope_freqs for Llama 3.1-style rope scaling."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    return np.where(wavelen < original_max_position / high_freq_factor, 1.0,
                    np.where(wavelen > original_max_position / low_freq_factor, factor,
                             1 / ((1 - smooth) / factor + smooth)))


def _rope_scaling(path: str, reader, config: dict) -> dict | None:
    """Llama 3.1's rope_scaling, recovered from the rope_freqs tensor (None when there is none).

    llama.cpp writes only the resulting factors; every Llama 3.1/3.2/3.3 uses low/high frequency
    factors 1 and 4 and an original context of 8192, so those are checked against the tensor.
    """
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    from gguf import dequantize
    stored = dequantize(tensor.data, tensor.tensor_type).reshape(-1).astype(np.float64)
    scaling = {"rope_type": "llama3", "factor": float(f"{stored.max():.7g}"), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    expected = _llama3_rope_factors(config["rope_theta"], config["head_dim"], scaling["factor"],
                                    1.0, 4.0, 8192)
    if expected.shape != stored.shape or not np.allclose(expected, stored, rtol=1e-5):
        raise ConfigError(f"GGUF file {path!r} carries rope_freqs that are not Llama 3.1's rope scaling "
                          "(low/high frequency factors 1 and 4, original context 8192); asyncserve cannot "
                          "recover them. Serve the Hugging Face checkpoint instead.")
    return scaling


def _hf_config(meta: dict, arch: str, tensor_names: set[str], vocab_size: int) -> dict:
    model_type, architecture, _ = ARCHITECTURES[arch]

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden, heads = get("embedding_length"), get("attention.head_count")
    config = {
        "architectures": [architecture], "model_type": model_type, "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
        "max_position_embeddings": get("context_length", 2048),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0), "rope_scaling": None,
        "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    else:
        config.update(use_sliding_window=False, sliding_window=None)
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        value = meta.get(f"tokenizer.ggml.{name}")
        if value is not None:
            config[key] = value
    return config


def _unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (it interleaves each head's two rotary halves)."""
    head_rows = weight.shape[0] // num_heads // 2
    return (weight.reshape(num_heads, head_rows, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    return None


def _write_weights(path: str, reader, config: dict, permuted: bool, dtype: str, progress: bool) -> None:
    """Dequantized tensors in `dtype`, in safetensors shards of SHARD_BYTES: memory stays bounded."""
    import torch
    from gguf import dequantize
    from tqdm.auto import tqdm

    shards: list[dict] = [{}]
    shard_bytes = 0
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        if tensor.name == "rope_freqs.weight":  # read into config.json's rope_scaling
            continue
        name = _hf_name(tensor.name)
        if name is None:
            raise ConfigError(f"GGUF tensor {tensor.name!r} has no place in a {config['architectures'][0]}; "
                              "this file is not of a supported layout.")
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dims innermost first
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)
        if permuted and ".attn_q." in tensor.name:
            weight = _unpermute_rotary_rows(weight, config["num_attention_heads"])
        elif permuted and ".attn_k." in tensor.name:
            weight = _unpermute_rotary_rows(weight, config["num_key_value_heads"])
        weight = np.ascontiguousarray(weight)
        value = torch.from_numpy(weight if weight.flags.writeable else weight.copy()).to(getattr(torch, dtype))
        if shard_bytes and shard_bytes + value.nbytes > SHARD_BYTES:
            _save_shard(shards, path)
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = value
        shard_bytes += value.nbytes
    _save_shard(shards, path)
    if len(shards) == 1:
        os.rename(os.path.join(path, "model-00001.safetensors"), os.path.join(path, "model.safetensors"))
    else:
        weight_map = {name: f"model-{index:05d}.safetensors"
                      for index, shard in enumerate(shards, 1) for name in shard}
        _write_json(os.path.join(path, "model.safetensors.index.json"), {"metadata": {}, "weight_map": weight_map})


def _save_shard(shards: list[dict], path: str) -> None:
    from safetensors.torch import save_file
    save_file(shards[-1], os.path.join(path, f"model-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
    shards[-1] = dict.fromkeys(shards[-1])  # keep the names for the index, free the tensors


def _byte_level_backend(meta: dict):
    """GPT-2-style byte-level BPE from the file's tokens and merges, split as `tokenizer.ggml.pre` says."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ConfigError(f"GGUF pre-tokenizer {pre!r} is not known to asyncserve (known: "
                          f"{', '.join(sorted(_PRE_TOKENIZERS))}); pass --tokenizer with the model's "
                          "Hugging Face tokenizer.")
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
    split = _PRE_TOKENIZERS[pre]
    if split == "digits":  # SmolLM: every digit alone, then GPT-2's byte-level split
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    elif split == "gpt2":
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        if split is _QWEN2_SPLIT:
            backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos_id is not None:  # Llama 3 style: BOS first
        bos = tokens[bos_id]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    backend.add_special_tokens([AddedToken(token, normalized=False, special=True)
                                for token, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(token, normalized=False, special=False)
                        for token, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
    return backend


def _write_tokenizer(path: str, gguf_path: str, meta: dict, max_length: int) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tokens = meta["tokenizer.ggml.tokens"]

        def token(key):
            index = meta.get(f"tokenizer.ggml.{key}")
            return tokens[index] if index is not None else None

        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=_byte_level_backend(meta), bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"), unk_token=token("unknown_token_id"),
            pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
            clean_up_tokenization_spaces=False, model_max_length=max_length)
    elif kind == "llama":  # sentencepiece: transformers rebuilds it (byte tokens, scores, Metaspace)
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                  gguf_file=os.path.basename(gguf_path))
    else:
        raise ConfigError(f"GGUF file {gguf_path!r} has tokenizer model {kind!r}; asyncserve builds 'gpt2' "
                          "(byte-level BPE) and 'llama' (sentencepiece) tokenizers. Pass --tokenizer.")
    tokenizer.save_pretrained(path)
    config_file = os.path.join(path, "tokenizer_config.json")
    with open(config_file, encoding="utf-8") as f:
        tokenizer_config = json.load(f)
    # A class name that transformers 4 and 5 both map to the plain tokenizers-backed class.
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if meta.get("tokenizer.chat_template"):
        tokenizer_config["chat_template"] = meta["tokenizer.chat_template"]
    _write_json(config_file, tokenizer_config)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")


def convert_gguf(gguf_path: str, out_dir: str, *, tokenizer: bool = True, dtype: str = "float32",
                 progress: bool = True) -> str:
    """Write a Hugging Face checkpoint directory for `gguf_path` at `out_dir` (atomically); return it.

    Weights are dequantized to `dtype` ("float32", "bfloat16" or "float16": the serving dtype).
    `tokenizer=False` skips the tokenizer files (the caller brings its own tokenizer).
    """
    from gguf import GGUFReader

    out_dir = os.path.abspath(out_dir)
    reader = GGUFReader(gguf_path)
    meta = _metadata(reader)
    arch = _check_supported(gguf_path, reader, meta)
    if tokenizer and "tokenizer.ggml.tokens" not in meta:
        raise ConfigError(f"GGUF file {gguf_path!r} carries no tokenizer (no tokenizer.ggml.tokens); pass "
                          "--tokenizer with the model's Hugging Face tokenizer.")
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ConfigError(f"GGUF file {gguf_path!r} has no token_embd.weight: it is not a whole model.")
    config = _hf_config(meta, arch, names, vocab_size=int(embedding.shape[1]))
    config["rope_scaling"] = _rope_scaling(gguf_path, reader, config)
    config["torch_dtype"] = dtype  # what the safetensors hold

    parent, name = os.path.split(out_dir)
    with scratch_dir(parent, name) as staging:
        os.chmod(staging, 0o755)
        _write_json(os.path.join(staging, "config.json"), config)
        generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if key in config}
        _write_json(os.path.join(staging, "generation_config.json"), generation)
        if tokenizer:
            _write_tokenizer(staging, gguf_path, meta, config["max_position_embeddings"])
        _write_weights(staging, reader, config, ARCHITECTURES[arch][2], dtype, progress)
        _write_json(os.path.join(staging, MARKER_FILE),
                    {"source": os.path.abspath(gguf_path), "version": CONVERTER_VERSION,
                     "tokenizer": tokenizer, "dtype": dtype})
        if os.path.isdir(out_dir) and not os.path.exists(os.path.join(out_dir, MARKER_FILE)):
            shutil.rmtree(out_dir, ignore_errors=True)  # an incomplete leftover
        try:
            os.rename(staging, out_dir)
        except OSError:  # another process finished first: keep its directory
            if not os.path.exists(os.path.join(out_dir, MARKER_FILE)):
                raise
    return out_dir


def is_converted(path: str) -> bool:
    return os.path.exists(os.path.join(path, MARKER_FILE))


def gguf_checkpoint_dir(gguf_path: str, *, tokenizer: bool = True, dtype: str = "float32") -> str:
    """The cached Hugging Face directory of a GGUF file in `dtype`, converting it on first use."""
    if not os.path.isfile(gguf_path):
        raise ConfigError(f"GGUF file {gguf_path!r} does not exist.")
    stat = os.stat(gguf_path)
    identity = (f"{os.path.abspath(gguf_path)}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERTER_VERSION}|"
                f"{tokenizer}|{dtype}")
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    out_dir = os.path.join(cache_dir(), "gguf", f"{stem}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}")
    if is_converted(out_dir):
        return out_dir
    logger.info("converting %s to a Hugging Face checkpoint at %s (once; dequantized to %s)",
                gguf_path, out_dir, dtype)
    return convert_gguf(gguf_path, out_dir, tokenizer=tokenizer, dtype=dtype)
