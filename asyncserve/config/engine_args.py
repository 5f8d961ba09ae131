"""Engine settings with vLLM's names (`EngineConfig`, flat, what users pass), checked at once, and resolved
into the config tree (`config/tree.py`) once the checkpoint is known."""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from asyncserve.checkpoints.resolve import check_local_path
from asyncserve.config.cache import check_kv_cache_dtype, check_mamba_ssm_cache_dtype
from asyncserve.config.device import DTYPE_NAMES
from asyncserve.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only where a dtype or device is resolved: `--help` stays fast

    pass

logger = logging.getLogger("asyncserve")

# The grammar engines of structured outputs, by vLLM's names (engine/structured/ builds them).
STRUCTURED_OUTPUTS_BACKENDS = ("xgrammar", "guidance")

@dataclass
class EngineConfig:
    """Everything a user may set, flat, with vLLM's names; `model=None` serves SmolLM2-135M-Instruct
    (see default_model.py)."""

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
    # Largest step (tokens) of prefill chunks and decodes replayed from CUDA graphs; larger steps run
    # eagerly (the GPU then takes longer than the launches). vLLM's flag; 0: none.
    max_cudagraph_capture_size: int | None = None
    load_format: str = "auto"  # "auto", "safetensors", "dummy"
    tensor_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
    mamba_ssm_cache_dtype: str = "auto"  # hybrid models' recurrent states: 'auto' (the model's), 'float32', ...
    max_logprobs: int = 20
    trust_remote_code: bool = False  # accepted as vLLM does; asyncserve never runs a checkpoint's code
    generation_config: str = "auto"  # "auto" (the model's), "vllm" (none) or a folder with generation_config.json
    served_model_name: list[str] | str | None = None
    max_num_waiting: int | None = None  # beyond this the server answers 503
    disable_log_stats: bool = False
    # Embedding models, with vLLM's names: runner "pooling" (or convert "embed", or the older task
    # "embed") serves /v1/embeddings and LLM.embed; "auto" decides from the checkpoint (pooling_config.py).
    runner: str = "auto"
    convert: str = "auto"
    task: str | None = None
    pooler_config: dict | str | None = None  # {"pooling_type": "LAST"|"MEAN"|"CLS", "normalize": bool}
    override_pooler_config: dict | str | None = None  # vLLM's older name for pooler_config
    structured_outputs_backend: str = "xgrammar"  # or "guidance" (llguidance), as vLLM names them
    structured_outputs_cache_mb: float = 512.0  # compiled grammars kept, bounded by what they cost in memory
    structured_outputs_max_bytes: int = 65536  # the longest constraint text (schema, regex, grammar) compiled
    structured_outputs_compile_timeout: float = 10.0  # seconds a request waits for its grammar to compile
    # vLLM's JSON: {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, ...}
    # (config/speculative.py); parsed here into a SpeculativeConfig, None: no speculation.
    speculative_config: dict | str | None = None
    # LoRA adapters (vLLM's names): requests name one with a LoRARequest; max_loras of them run in one batch.
    scheduling_policy: str = "fcfs"  # vLLM's: "fcfs", or "priority" (requests' `priority`, lower first)
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    # Images (vLLM's names): how many a prompt may carry ('{"image": 2}'), the folder file:// URLs may
    # read (None: file:// refused), and the hosts http(s) URLs may name (None: any).
    limit_mm_per_prompt: dict | str | None = None
    allowed_local_media_path: str | None = None
    allowed_media_domains: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_NAMES and self.dtype != "auto":
            raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {self.dtype!r}.")
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
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}.")
        if self.quantization is not None:  # an unknown method fails here, before anything loads
            from asyncserve.config.quantization import check_method_name
            check_method_name(self.quantization)
        check_kv_cache_dtype(self.kv_cache_dtype)
        check_mamba_ssm_cache_dtype(self.mamba_ssm_cache_dtype)
        if self.generation_config not in ("auto", "vllm") and not os.path.exists(self.generation_config):
            raise ConfigError(f"generation_config={self.generation_config!r} is neither 'auto', 'vllm' nor an "
                              "existing folder with a generation_config.json.")
        if self.model is not None:
            from asyncserve.checkpoints.default_model import TINY_MODEL
            if self.model != TINY_MODEL:
                check_local_path(self.model)
                if self.tensor_parallel_size > 1:  # before anything loads (or downloads)
                    from asyncserve.config.tp_shapes import check_checkpoint_shapes
                    check_checkpoint_shapes(self.model, self.revision, self.tensor_parallel_size)
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ConfigError(f"structured_outputs_backend must be one of {list(STRUCTURED_OUTPUTS_BACKENDS)}, got "
                              f"{self.structured_outputs_backend!r}.")
        if self.structured_outputs_backend == "guidance" and importlib.util.find_spec("llguidance") is None:
            raise ConfigError("structured_outputs_backend='guidance' needs llguidance: pip install llguidance "
                              "(or asyncserve[guidance]).")
        if self.max_logprobs < 0:
            raise ConfigError(f"max_logprobs must be >= 0, got {self.max_logprobs}.")
        for name in ("structured_outputs_cache_mb", "structured_outputs_max_bytes",
                     "structured_outputs_compile_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        from asyncserve.config.pooling import check_runner_args, parse_pooler_config
        check_runner_args(self.runner, self.convert, self.task)
        if self.pooler_config is not None and self.override_pooler_config is not None:
            raise ConfigError("Give pooler_config or its older name override_pooler_config, not both.")
        self.pooler_config = parse_pooler_config(
            self.pooler_config if self.pooler_config is not None else self.override_pooler_config)
        self.override_pooler_config = None
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ConfigError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}.")
        if self.enable_lora:
            from asyncserve.config.lora import check_lora_config
            check_lora_config(self.max_loras, self.max_lora_rank, self.max_cpu_loras)
        from asyncserve.config.multimodal import (check_local_media_path, check_media_domains,
                                                  parse_limit_mm_per_prompt)
        self.limit_mm_per_prompt = parse_limit_mm_per_prompt(self.limit_mm_per_prompt)
        self.allowed_local_media_path = check_local_media_path(self.allowed_local_media_path)
        self.allowed_media_domains = check_media_domains(self.allowed_media_domains)
        from asyncserve.config.speculative import parse_speculative_config
        self.speculative_config = parse_speculative_config(self.speculative_config)
        if self.speculative_config is not None and self.tensor_parallel_size > 1:
            raise ConfigError("speculative_config with tensor_parallel_size > 1 is not built in asyncserve yet: "
                              "serve with tensor_parallel_size=1, or without speculative_config.")

    @property
    def model_names(self) -> list[str]:
        if self.served_model_name:
            names = self.served_model_name
            return [names] if isinstance(names, str) else list(names)
        from asyncserve.checkpoints.default_model import DEFAULT_MODEL
        return [self.model or DEFAULT_MODEL]


_DEFAULT_GPU_MEMORY_UTILIZATION = EngineConfig.gpu_memory_utilization
