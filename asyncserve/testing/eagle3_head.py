"""EAGLE-3 head checkpoints in the public layout (SafeAILab's EAGLE-3 / SpecForge: config.json with
`LlamaForCausalLMEagle3` and `draft_vocab_size`; tensors `fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`,
`t2d`), with random weights, for a given target: the tests' heads and the benchmark's dummy 8B head."""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file


def eagle3_head_tensors(hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, vocab_size: int, draft_vocab_size: int, *, seed: int = 0,
                        std: float = 0.25, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors under the public names; `d2t` maps the draft ids onto a random sorted subset of the
    target's vocabulary (`t2d` marks it), as the real heads keep the target's most frequent tokens."""
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return (torch.randn(*shape, generator=generator) * std).to(dtype)

    def norm():
        return (1 + 0.1 * torch.randn(hidden_size, generator=generator)).to(dtype)

    kept = torch.randperm(vocab_size, generator=generator)[:draft_vocab_size].sort().values
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[kept] = True
    return {
        "fc.weight": weight(hidden_size, 3 * hidden_size),
        "midlayer.self_attn.q_proj.weight": weight(num_heads * head_dim, 2 * hidden_size),
        "midlayer.self_attn.k_proj.weight": weight(num_kv_heads * head_dim, 2 * hidden_size),
        "midlayer.self_attn.v_proj.weight": weight(num_kv_heads * head_dim, 2 * hidden_size),
        "midlayer.self_attn.o_proj.weight": weight(hidden_size, num_heads * head_dim),
        "midlayer.mlp.gate_proj.weight": weight(intermediate_size, hidden_size),
        "midlayer.mlp.up_proj.weight": weight(intermediate_size, hidden_size),
        "midlayer.mlp.down_proj.weight": weight(hidden_size, intermediate_size),
        "midlayer.input_layernorm.weight": norm(),
        "midlayer.hidden_norm.weight": norm(),
        "midlayer.post_attention_layernorm.weight": norm(),
        "norm.weight": norm(),
        "lm_head.weight": weight(draft_vocab_size, hidden_size),
        "d2t": kept - torch.arange(draft_vocab_size),
        "t2d": t2d,
    }


def build_eagle3_head(path, target_path: str, *, draft_vocab_size: int | None = None,
                      aux_layer_ids: list[int] | None = None, seed: int = 0, std: float = 0.25,
                      dtype: torch.dtype = torch.float32, overrides: dict | None = None) -> str:
    """Writes a head for the target checkpoint at `target_path` (its hidden size, heads, vocabulary) at
    `path`; `overrides` replaces tensors by name (or drops those set to None). Returns the path."""
    with open(os.path.join(target_path, "config.json")) as f:
        target = json.load(f)
    hidden_size, num_heads = target["hidden_size"], target["num_attention_heads"]
    num_kv_heads = target.get("num_key_value_heads") or num_heads
    head_dim = target.get("head_dim") or hidden_size // num_heads
    vocab_size = target["vocab_size"]
    draft_vocab_size = draft_vocab_size or vocab_size
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden_size, "intermediate_size": target["intermediate_size"],
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "num_hidden_layers": 1, "rms_norm_eps": target.get("rms_norm_eps", 1e-6),
        "rope_theta": target.get("rope_theta", 10000.0), "rope_scaling": target.get("rope_scaling"),
        "max_position_embeddings": 2048, "vocab_size": vocab_size, "draft_vocab_size": draft_vocab_size,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if aux_layer_ids is not None:
        config["eagle_aux_hidden_state_layer_ids"] = list(aux_layer_ids)
    tensors = eagle3_head_tensors(hidden_size, target["intermediate_size"], num_heads, num_kv_heads, head_dim,
                                  vocab_size, draft_vocab_size, seed=seed, std=std, dtype=dtype)
    for name, tensor in (overrides or {}).items():
        if tensor is None:
            tensors.pop(name, None)
        else:
            tensors[name] = tensor
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()},
              os.path.join(path, "model.safetensors"))
    return os.fspath(path)
