"""Writes a Llama-shaped checkpoint of random weights, as the hub stores it (bf16, or GPTQ / FP8 tensors
when the config carries that `quantization_config`), so start-up can be timed through the real
safetensors loading path instead of `--load-format dummy`.

    python scripts/make_random_checkpoint.py scripts/model_configs/llama-3.1-8b-gptq-int4 /tmp/llama-gptq
    python scripts/bench_latency.py --model /tmp/llama-gptq --no-hf
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

SHARD_BYTES = 4 << 30


def _linear_tensors(name: str, k: int, n: int, quant: dict | None, gen: torch.Generator) -> dict:
    method = (quant or {}).get("quant_method")
    if method is None:
        return {f"{name}.weight": (torch.rand(n, k, generator=gen) * 0.04 - 0.02).to(torch.bfloat16)}
    if method == "gptq":
        bits, group = quant["bits"], quant["group_size"]
        per, groups = 32 // bits, k // group
        return {f"{name}.qweight": torch.randint(-2**31, 2**31 - 1, (k // per, n), generator=gen, dtype=torch.int32),
                f"{name}.qzeros": torch.randint(-2**31, 2**31 - 1, (groups, n // per), generator=gen,
                                                dtype=torch.int32),
                f"{name}.scales": (torch.rand(groups, n, generator=gen) * 0.01).half(),
                f"{name}.g_idx": torch.arange(k, dtype=torch.int32) // group}
    if method == "fp8":
        return {f"{name}.weight": (torch.rand(n, k, generator=gen) * 2 - 1).to(torch.float8_e4m3fn),
                f"{name}.weight_scale": torch.rand(n, 1, generator=gen) * 0.01}
    raise SystemExit(f"quant_method {method!r}: only gptq and fp8 are written by this script")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    config = json.load(open(os.path.join(args.config_dir, "config.json")))
    quant = config.get("quantization_config")
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim", hidden // heads)
    vocab = config["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    os.makedirs(args.out_dir, exist_ok=True)
    shutil.copy(os.path.join(args.config_dir, "config.json"), args.out_dir)
    shard, shard_bytes, files = {}, 0, []

    def add(tensors: dict) -> None:
        nonlocal shard, shard_bytes
        shard.update(tensors)
        shard_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if shard_bytes >= SHARD_BYTES:
            flush()

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, os.path.join(args.out_dir, files[-1]), metadata={"format": "pt"})
            print(f"wrote {files[-1]} ({shard_bytes / 1e9:.2f} GB)", flush=True)
        shard, shard_bytes = {}, 0

    add({"model.embed_tokens.weight": (torch.rand(vocab, hidden, generator=gen) * 0.04 - 0.02).bfloat16(),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        tensors = {f"{prefix}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        for name, k, n in (("self_attn.q_proj", hidden, heads * head_dim),
                           ("self_attn.k_proj", hidden, kv_heads * head_dim),
                           ("self_attn.v_proj", hidden, kv_heads * head_dim),
                           ("self_attn.o_proj", heads * head_dim, hidden),
                           ("mlp.gate_proj", hidden, inter), ("mlp.up_proj", hidden, inter),
                           ("mlp.down_proj", inter, hidden)):
            tensors.update(_linear_tensors(f"{prefix}.{name}", k, n, quant, gen))
        add(tensors)
    if not config.get("tie_word_embeddings"):
        add({"lm_head.weight": (torch.rand(vocab, hidden, generator=gen) * 0.04 - 0.02).bfloat16()})
    flush()


if __name__ == "__main__":
    main()
