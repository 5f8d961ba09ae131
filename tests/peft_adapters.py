"""LoRA adapters saved by PEFT itself for the tiny checkpoints, with PEFT's merged model as the reference."""
from __future__ import annotations

import torch


def save_peft_adapter(base_dir: str, out_dir: str, targets: list[str], rank: int, alpha: float,
                      use_rslora: bool = False, seed: int = 0):
    """Writes a PEFT LoRA adapter of the checkpoint at `base_dir` into `out_dir` (nonzero B, so it changes
    the output) and returns transformers' model with the adapter merged (fp32, eval)."""
    import peft
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                             init_lora_weights=False)
    torch.manual_seed(seed)
    wrapped = peft.get_peft_model(model, config)
    wrapped.save_pretrained(out_dir)
    return wrapped.merge_and_unload().eval()
