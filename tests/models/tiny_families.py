"""Tiny random checkpoints of OPT, GPT-2 and Phi-3, built with transformers' own classes: each variant
a checkpoint asyncserve must serve token for token like transformers does."""
from __future__ import annotations

import json
import os

import torch

from asyncserve.testing.tiny_model import INIT_STD, NORM_STD, build_tokenizer

# LongRoPE: a small original context, so prompts and outputs of a few dozen tokens cross it.
LONGROPE_ORIGINAL = 48
_SHORT_FACTOR = [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 3.5]
_LONG_FACTOR = [1.0, 1.5, 2.5, 4.0, 6.0, 9.0, 12.0, 16.0]

# variant -> (config class, config kwargs)
VARIANTS = {
    "opt": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                          "max_position_embeddings": 512, "word_embed_proj_dim": 64,
                          "do_layer_norm_before": True, "activation_function": "relu"}),
    # opt-350m's shape: post-LN blocks, a narrower word embedding with project_in/out.
    "opt-postln": ("OPTConfig", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "max_position_embeddings": 512,
                                 "word_embed_proj_dim": 32, "do_layer_norm_before": False,
                                 "activation_function": "relu"}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "n_inner": 128,
                            "activation_function": "gelu_new"}),
    "gpt2-layer-scaled": ("GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512,
                                         "activation_function": "gelu_new",
                                         "scale_attn_by_inverse_layer_idx": True,
                                         "reorder_and_upcast_attn": True}),
    "phi3": ("Phi3Config", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                            "original_max_position_embeddings": 512, "rope_theta": 10000.0,
                            "partial_rotary_factor": 0.5, "sliding_window": 16,  # prompts cross it
                            "tie_word_embeddings": False}),
    "phi3-longrope": ("Phi3Config", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "max_position_embeddings": 4 * LONGROPE_ORIGINAL,
                                     "original_max_position_embeddings": LONGROPE_ORIGINAL,
                                     "rope_theta": 10000.0, "sliding_window": None, "tie_word_embeddings": False,
                                     "rope_scaling": {"type": "longrope", "short_factor": _SHORT_FACTOR,
                                                      "long_factor": _LONG_FACTOR}}),
}


def _init_weights(model, seed: int) -> None:
    """N(0, INIT_STD) for matrices and biases (embeddings too), 1 + N(0, NORM_STD) for norm weights."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            is_norm = "norm" in name or ".ln_" in name
            if is_norm and name.endswith("weight"):
                param.copy_(1.0 + NORM_STD * noise)
            elif is_norm:
                param.copy_(NORM_STD * noise)
            else:
                param.copy_(INIT_STD * noise)


def build_variant(path, variant: str, seed: int = 0, **overrides) -> str:
    """Writes the checkpoint of `variant` (a key of VARIANTS, its config updated by `overrides`) with a
    byte-level BPE tokenizer; its path."""
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    class_name, kwargs = VARIANTS[variant]
    kwargs = {**kwargs, **overrides}
    tokenizer = build_tokenizer("byte_level")
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), end_of_text]
    ids = {"bos_token_id": end_of_text, "eos_token_id": eos[0], "pad_token_id": end_of_text}
    config = getattr(transformers, class_name)(vocab_size=len(tokenizer), **ids, **kwargs)
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    _init_weights(model, seed)
    model.generation_config = GenerationConfig(**{**ids, "eos_token_id": eos})
    path = os.fspath(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if variant == "phi3-longrope":  # as Phi-3-mini-128k's config.json spells it (transformers reads both)
        _hub_rope_form(path, kwargs)
    return path


def _hub_rope_form(path: str, kwargs: dict) -> None:
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    config.pop("rope_parameters", None)
    config.update(rope_theta=kwargs["rope_theta"], rope_scaling={**kwargs["rope_scaling"], "type": "su"},
                  original_max_position_embeddings=kwargs["original_max_position_embeddings"])
    with open(file, "w") as f:
        json.dump(config, f, indent=2)
