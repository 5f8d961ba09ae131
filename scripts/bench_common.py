"""Shared by the GPU benchmarks: hardware floors measured on the card, model resolution, HF baselines."""
from __future__ import annotations

import gc
import os
import time

import torch

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def resolve_model(name: str) -> tuple[str, str]:
    """(path, load_format): a name from scripts/model_configs runs with dummy weights."""
    candidate = os.path.join(CONFIG_DIR, name)
    if os.path.isdir(candidate):
        return candidate, "dummy"
    return name, "auto"


def measure_bandwidth(device="cuda", nbytes=2 << 30, repeats=10) -> float:
    """Device-to-device copy rate in bytes/s (read + write)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    del src, dst
    return 2 * nbytes / seconds


def measure_matmul_rate(device="cuda", size=8192, repeats=20) -> float:
    """Dense bf16 matmul FLOP/s."""
    a = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    b = torch.randn(size, size, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / repeats
    del a, b
    return 2 * size ** 3 / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def num_params(model: torch.nn.Module) -> int:
    """Parameters the model multiplies by: a quantized linear counts in x out, not its packed words."""
    from asyncserve.layers.moe import FusedMoE
    total = 0
    for module in model.modules():
        if isinstance(module, FusedMoE):  # quantized experts count as their weights too
            total += _expert_weights(module) + sum(p.numel() for p in (module.w13_bias, module.w2_bias)
                                                   if p is not None)
        elif hasattr(module, "quant_method") and hasattr(module, "in_features"):
            bias = getattr(module, "bias", None)
            total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
        else:
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def _moe_layers(model: torch.nn.Module):
    from asyncserve.layers.moe import FusedMoE
    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def _expert_weights(moe) -> int:
    """A MoE layer's expert weights (this rank's slice), not its packed words: E x 3 x H x I."""
    return moe.num_experts * 3 * moe.hidden_size * moe.intermediate_size


def _expert_bytes(moe) -> int:
    """Bytes of every expert tensor of a MoE layer, in whatever form its quantization stores them."""
    return sum(p.numel() * p.element_size() for name, p in moe.named_parameters(recurse=False)
               if name.startswith(("w13_", "w2_")))


def expected_experts_read(num_experts: int, top_k: int, batch_size: int) -> float:
    """Distinct experts a decode step of `batch_size` tokens routes to, each token picking top_k of
    num_experts uniformly: exactly top_k at batch 1, all of them as the batch grows."""
    return num_experts * (1 - (1 - top_k / num_experts) ** batch_size)


def decode_bytes_per_step(model: torch.nn.Module, batch_size: int = 1) -> int:
    """Weight bytes a decode step must read: every weight (embeddings and LM head included), but of an
    MoE layer only the experts the batch routes to (`expected_experts_read`; at batch 1, the top-k)."""
    total = weight_bytes(model)
    for moe in _moe_layers(model):
        expert_bytes = _expert_bytes(moe) / moe.num_experts
        unread = moe.num_experts - expected_experts_read(moe.num_experts, moe.top_k, batch_size)
        total -= int(unread * expert_bytes)
    return total


def active_params(model: torch.nn.Module) -> int:
    """Parameters each token multiplies by: all of them, but top_k of an MoE layer's experts."""
    total = num_params(model)
    for moe in _moe_layers(model):
        expert_params = _expert_weights(moe)
        total -= expert_params * (moe.num_experts - moe.top_k) // moe.num_experts
    return total


def hf_model(path: str, dtype=torch.bfloat16):
    """transformers' own model with random weights of the same shape (the baseline)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def free_cuda() -> None:
    """Returns the memory of models that went out of scope to the device."""
    gc.collect()
    torch.cuda.empty_cache()


def vocab_size(path: str) -> int:
    """The text model's vocabulary, also for checkpoints whose config nests it (Qwen3.5's text_config)."""
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(path).get_text_config().vocab_size


def random_prompts(num: int, lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab - 10, (length,), generator=generator).tolist() for length in lengths]
