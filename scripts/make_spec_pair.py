"""A target checkpoint and draft checkpoints whose agreement is set by construction, for measuring
speculative decoding's speed-up against acceptance on a real shape without trained weights.

The target is a Llama-shaped model of random weights (normal, std 0.02) whose layers from `--draft-layers` on
write nothing back (their o_proj and down_proj are zero): it costs every layer's reads and FLOPs, but its
tokens are those of its first `--draft-layers` layers. Each draft is those first layers (sharing the target's
embedding and LM head files through symlinks) with Gaussian noise of `sigma` x 0.02 added to its layer
weights: sigma 0 agrees with the target on every token (up to bf16 rounding between kernel shapes), larger
sigmas less often. On a 1024-wide CPU analogue, per-token agreement was ~0.87 at sigma 0.02, ~0.60 at 0.05,
~0.28 at 0.1 (K = 4 drafts make vLLM's acceptance rate lower than the per-token agreement). Both engines
load the same files, so their acceptance is comparable.

    python scripts/bench_models.py llama-3.1-8b --out /tmp/llama8b          # config + tokenizer
    python scripts/make_spec_pair.py /tmp/llama8b /tmp/spec8b --draft-layers 4 --sigmas 0 0.015 0.05
    python scripts/bench_spec_decode.py --model /tmp/spec8b/target --draft-model /tmp/spec8b/draft-0.015 ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch
from safetensors.torch import save_file

STD = 0.02
_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_WRITE_BACK = ("self_attn.o_proj", "mlp.down_proj")  # zero in the target's tail: the layer adds nothing


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", hidden // heads)
    return {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
            "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def _normal(shape, gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.empty(shape, device=device, dtype=torch.float32).normal_(0.0, STD, generator=gen)


def _layer(index: int, config: dict, gen: torch.Generator, device: str, silent: bool) -> dict[str, torch.Tensor]:
    hidden = config["hidden_size"]
    prefix = f"model.layers.{index}"
    out = {f"{prefix}.input_layernorm.weight": torch.ones(hidden),
           f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden)}
    for name, shape in _shapes(config).items():
        weight = _normal(shape, gen, device)
        if silent and name in _WRITE_BACK:
            weight.zero_()
        out[f"{prefix}.{name}.weight"] = weight
    return out


def _save(tensors: dict[str, torch.Tensor], path: str) -> None:
    save_file({k: v.to(torch.bfloat16).cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"format": "pt"})


def _copy_side_files(src: str, dest: str, config: dict) -> None:
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in os.listdir(src):
        if name.startswith(("tokenizer", "special_tokens", "generation_config", "vocab", "merges")):
            shutil.copy(os.path.join(src, name), dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", help="a folder with config.json and tokenizer files (bench_models.py)")
    parser.add_argument("out_dir")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.015, 0.05])
    args = parser.parse_args()
    with open(os.path.join(args.model_dir, "config.json")) as f:
        config = json.load(f)
    if config.get("tie_word_embeddings"):
        raise SystemExit("a config with untied embeddings is expected (the 8B shapes)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    target = os.path.join(args.out_dir, "target")
    _copy_side_files(args.model_dir, target, {**config, "torch_dtype": "bfloat16"})
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    _save({"model.embed_tokens.weight": _normal((vocab, hidden), gen, device),
           "model.norm.weight": torch.ones(hidden)}, os.path.join(target, "embed.safetensors"))
    _save({"lm_head.weight": _normal((vocab, hidden), gen, device)}, os.path.join(target, "head.safetensors"))
    kept = {}
    for index in range(config["num_hidden_layers"]):
        layer = _layer(index, config, gen, device, silent=index >= args.draft_layers)
        _save(layer, os.path.join(target, f"layer-{index:03d}.safetensors"))
        if index < args.draft_layers:
            kept[index] = layer
        else:
            del layer
    print(f"target: {target} ({config['num_hidden_layers']} layers, the last "
          f"{config['num_hidden_layers'] - args.draft_layers} write nothing back)", flush=True)
    draft_config = {**config, "num_hidden_layers": args.draft_layers, "torch_dtype": "bfloat16"}
    for sigma in args.sigmas:
        draft = os.path.join(args.out_dir, f"draft-{sigma:g}")
        _copy_side_files(args.model_dir, draft, draft_config)
        for shared in ("embed.safetensors", "head.safetensors"):
            link = os.path.join(draft, shared)
            if not os.path.lexists(link):
                os.symlink(os.path.join(os.path.abspath(target), shared), link)
        for index, layer in kept.items():
            name = f"layer-{index:03d}.safetensors"
            if sigma == 0:
                link = os.path.join(draft, name)
                if not os.path.lexists(link):
                    os.symlink(os.path.join(os.path.abspath(target), name), link)
                continue
            noisy = {k: v + sigma * _normal(v.shape, gen, device) if v.dim() == 2 else v for k, v in layer.items()}
            _save(noisy, os.path.join(draft, name))
        print(f"draft: {draft} ({args.draft_layers} layers, noise {sigma:g} x {STD})", flush=True)


if __name__ == "__main__":
    main()
