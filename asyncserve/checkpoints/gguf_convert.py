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
from asyncserve.checkpoints.gguf_archs import ARCHITECTURES, GGUFView, hf_config
from asyncserve.checkpoints.gguf_tokenizer import write_tokenizer
from asyncserve.checkpoints.cache import cache_dir
from asyncserve.checkpoints.scratch import scratch_dir

logger = logging.getLogger("asyncserve")

SHARD_BYTES = 2 << 30  # largest safetensors file written
CONVERTER_VERSION = 1  # bump when the conversion's output changes: cached directories are rebuilt
MARKER_FILE = "asyncserve_gguf.json"  # written last: the directory is complete

# Tensor types dequantized at load (each checked against transformers' GGUF loading in tests/test_gguf.py).
QUANT_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


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


def _write_weights(path: str, reader, arch: str, config: dict, dtype: str, progress: bool) -> None:
    """Dequantized tensors in `dtype`, in safetensors shards of SHARD_BYTES: memory stays bounded."""
    import torch
    from gguf import dequantize
    from tqdm.auto import tqdm

    architecture = ARCHITECTURES[arch]
    shards: list[dict] = [{}]
    shard_bytes = 0
    for tensor in tqdm(reader.tensors, desc="Dequantizing GGUF", unit="tensor", disable=not progress):
        if tensor.name in architecture.config_tensors:  # read into config.json
            continue
        name = architecture.hf_name(tensor.name)
        if name is None:
            raise ConfigError(f"GGUF tensor {tensor.name!r} has no place in a {config['architectures'][0]}; "
                              "this file is not of a supported layout.")
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # GGUF lists dims innermost first
        weight = dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32, copy=False)
        weight = np.ascontiguousarray(architecture.restore(tensor.name, weight, config))
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
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise ConfigError(f"GGUF file {gguf_path!r} has no token_embd.weight: it is not a whole model.")
    config = hf_config(GGUFView(gguf_path, reader, meta), vocab_size=int(embedding.shape[1]))
    config["torch_dtype"] = dtype  # what the safetensors hold

    parent, name = os.path.split(out_dir)
    with scratch_dir(parent, name) as staging:
        os.chmod(staging, 0o755)
        _write_json(os.path.join(staging, "config.json"), config)
        generation = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if key in config}
        _write_json(os.path.join(staging, "generation_config.json"), generation)
        if tokenizer:
            write_tokenizer(staging, gguf_path, meta, config["max_position_embeddings"])
        _write_weights(staging, reader, arch, config, dtype, progress)
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
