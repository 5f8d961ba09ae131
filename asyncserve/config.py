"""Engine settings with vLLM's names, and what they resolve to once the checkpoint is known."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from asyncserve.errors import ConfigError

logger = logging.getLogger("asyncserve")

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


@dataclass
class EngineConfig:
    """Everything the engine needs; `model=None` serves SmolLM2-135M-Instruct (see default_model.py)."""

    model: str | None = None
    tokenizer: str | None = None
    skip_tokenizer_init: bool = False  # token ids in, token ids out (benchmarks with dummy weights)
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_space: float = 1.0  # GiB of KV pool when running on the CPU
    num_gpu_blocks_override: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    preemption_mode: str = "recompute"
    swap_space: float = 4.0  # GiB of pinned CPU memory for swapped-out blocks
    enforce_eager: bool = False
    load_format: str = "auto"  # "auto", "safetensors", "dummy"
    tensor_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    max_logprobs: int = 20
    trust_remote_code: bool = False
    served_model_name: list[str] | str | None = None
    max_num_waiting: int | None = None  # beyond this the server answers 503
    disable_log_stats: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES and self.dtype != "auto":
            raise ConfigError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.block_size not in (8, 16, 32, 64, 128, 256):
            raise ConfigError(f"block_size must be one of 8, 16, 32, 64, 128, 256, got {self.block_size}.")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}.")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise ConfigError(f"load_format must be 'auto', 'safetensors' or 'dummy', got {self.load_format!r}.")
        if self.tensor_parallel_size != 1:
            raise ConfigError("tensor_parallel_size > 1 is not supported yet: run one replica per GPU "
                              "behind a load balancer.")
        if self.quantization is not None:
            raise ConfigError(f"quantization={self.quantization!r} is not supported yet; serve an "
                              "unquantized checkpoint (bf16/fp16).")
        if self.kv_cache_dtype != "auto":
            raise ConfigError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported yet; use 'auto'.")
        if self.trust_remote_code:
            raise ConfigError("trust_remote_code is not supported: asyncserve runs its own model code.")
        if self.max_logprobs < 0:
            raise ConfigError(f"max_logprobs must be >= 0, got {self.max_logprobs}.")

    @property
    def model_path(self) -> str:
        """The local checkpoint directory: downloads a hub id, converts a .gguf file once, finds or
        builds the default model (SmolLM2-135M-Instruct) and the tiny random one (`asyncserve/tiny-random`)."""
        from asyncserve.default_model import TINY_MODEL, default_model_path
        if self.model is None:
            return default_model_path()
        if self.model == TINY_MODEL and not os.path.isdir(self.model):
            from asyncserve.tiny_model import default_model_path as tiny_model_path
            return tiny_model_path()
        if self.model.endswith(".gguf") and not os.path.isdir(self.model):
            from asyncserve.gguf_convert import gguf_checkpoint_dir
            serving = resolve_dtype(self.dtype, None, resolve_device(self.device))  # bf16 on GPU, fp32 on CPU
            return gguf_checkpoint_dir(self.model, tokenizer=self.tokenizer is None,
                                       dtype=str(serving).removeprefix("torch."))
        return resolve_checkpoint(self.model, self.revision)

    @property
    def model_names(self) -> list[str]:
        if self.served_model_name:
            names = self.served_model_name
            return [names] if isinstance(names, str) else list(names)
        from asyncserve.default_model import DEFAULT_MODEL
        return [self.model or DEFAULT_MODEL]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA device.")
    return torch.device(device)


def resolve_dtype(dtype: str, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto' keeps a half-precision checkpoint's dtype on GPU, bf16 for fp32 ones, fp32 on CPU."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16


def resolve_checkpoint(model: str, revision: str | None = None) -> str:
    """A local directory is used as is; anything else is treated as a Hugging Face hub id."""
    if os.path.isdir(model):
        return model
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:  # no network, unknown id, gated repo ...
        raise ConfigError(f"Could not find model {model!r}: it is not a local directory and the "
                          f"Hugging Face hub download failed ({type(exc).__name__}: {exc}). Pass the "
                          "path of a checkpoint directory (config.json + *.safetensors).") from exc
