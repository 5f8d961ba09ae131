"""Variants of the tiny checkpoints for tests: another config.json, other weights, same tokenizer."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

_BIAS_VALUE = 64.0  # residual dimension 0 of every position in a prefer_tokens model


def copy_checkpoint(source: str, target, config_updates: dict | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> str:
    """Copies `source` to `target` with config.json updated; `weights` replace every safetensors file."""
    target = os.fspath(target)
    shutil.copytree(source, target)
    with open(os.path.join(target, "config.json")) as f:
        config = json.load(f)
    config.update(config_updates or {})
    with open(os.path.join(target, "config.json"), "w") as f:
        json.dump(config, f)
    if weights is not None:
        for name in os.listdir(target):
            if name.endswith(".safetensors") or name == "model.safetensors.index.json":
                os.remove(os.path.join(target, name))
        save_file({name: tensor.contiguous() for name, tensor in weights.items()},
                  os.path.join(target, "model.safetensors"))
    return target


def prefer_tokens(source: str, target, boosts: dict[int, float]) -> str:
    """A copy of the tiny Llama-style checkpoint `source` whose LM head adds about `boosts[t]` to token t's
    logit at every position: a model that picks those tokens whenever a mask lets it.

    Residual dimension 0 is made a constant (every embedding holds _BIAS_VALUE there; no attention output or
    MLP writes to it), so after the final norm it is a positive constant; the untied LM head reads only the
    boosted tokens from it.
    """
    from safetensors.torch import load_file
    weights = {}
    for name in sorted(os.listdir(source)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(source, name)))
    embed = weights["model.embed_tokens.weight"].clone()
    embed[:, 0] = _BIAS_VALUE
    head = weights.get("lm_head.weight", weights["model.embed_tokens.weight"]).clone()
    head[:, 0] = 0.0
    for name, tensor in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            tensor[0, :] = 0.0
    norm = weights["model.norm.weight"]
    hidden = embed.shape[1]
    # The final norm's output at dimension 0 is close to sqrt(hidden) * norm[0]: the constant dominates.
    scale = float(norm[0]) * hidden ** 0.5
    for token_id, boost in boosts.items():
        head[token_id, 0] = boost / scale
    weights.update({"model.embed_tokens.weight": embed, "lm_head.weight": head})
    return copy_checkpoint(source, target, {"tie_word_embeddings": False}, weights)



def prefer_json_breaking_tokens(source: str, target) -> str:
    """A copy of `source` whose head strongly prefers tokens holding a control character, then tokens
    holding a backslash, then a quote: whatever a grammar lets through of what breaks JSON, it writes."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(source)
    boosts = {}
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if any(ord(char) < 0x20 for char in text):
            boosts[token_id] = 12.0
        elif "\\" in text:
            boosts[token_id] = 8.0
        elif '"' in text:
            boosts[token_id] = 3.0
    return prefer_tokens(source, target, boosts)
