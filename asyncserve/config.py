"""Engine settings with vLLM's names (`EngineConfig`, flat, what users pass), and the config tree they
resolve to once the checkpoint is known (`Config`: model / cache / scheduler / parallel / quantization).

Every component receives the tree whole and reads its fields where they live; none keeps a copy.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from asyncserve.errors import ConfigError

if TYPE_CHECKING:  # torch is imported only where a dtype or device is resolved: `--help` stays fast
    import torch

    from asyncserve.model_config import ModelConfig

logger = logging.getLogger("asyncserve")

# Every dtype name a user may give (vLLM's and torch's spellings) -> the torch dtype's name.
DTYPE_NAMES = {
    "float32": "float32", "float": "float32", "fp32": "float32",
    "float16": "float16", "half": "float16", "fp16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
# --kv-cache-dtype names (vLLM's) -> the pool's torch dtype name; "auto" is the model's dtype.
KV_CACHE_DTYPE_NAMES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn"}


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
    load_format: str = "auto"  # "auto", "safetensors", "dummy"
    tensor_parallel_size: int = 1
    quantization: str | None = None
    kv_cache_dtype: str = "auto"
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
            from asyncserve.layers.quantization import check_method_name
            check_method_name(self.quantization)
        check_kv_cache_dtype(self.kv_cache_dtype)
        if self.generation_config not in ("auto", "vllm") and not os.path.exists(self.generation_config):
            raise ConfigError(f"generation_config={self.generation_config!r} is neither 'auto', 'vllm' nor an "
                              "existing folder with a generation_config.json.")
        if self.model is not None:
            from asyncserve.default_model import TINY_MODEL
            if self.model != TINY_MODEL:
                check_local_path(self.model)
        from asyncserve.engine.structured.backend import BACKENDS
        if self.structured_outputs_backend not in BACKENDS:
            raise ConfigError(f"structured_outputs_backend must be one of {list(BACKENDS)}, got "
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
        from asyncserve.pooling_config import check_runner_args, parse_pooler_config
        check_runner_args(self.runner, self.convert, self.task)
        if self.pooler_config is not None and self.override_pooler_config is not None:
            raise ConfigError("Give pooler_config or its older name override_pooler_config, not both.")
        self.pooler_config = parse_pooler_config(
            self.pooler_config if self.pooler_config is not None else self.override_pooler_config)
        self.override_pooler_config = None

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

    def create_config(self) -> "Config":
        """Reads the checkpoint's config and resolves everything that depends on it."""
        from asyncserve.model_config import kv_recompute_length, load_model_config
        from asyncserve.models.loader import quantization_config
        model = load_model_config(self, self.model_path)
        prefix_caching = self.enable_prefix_caching
        if model.pooler is not None and model.pooler.pooling_type != "LAST" and prefix_caching:
            # A cached prefix's hidden states are never computed: mean and CLS pooling need them all.
            logger.info("prefix caching is off: %s pooling reads every prompt token's hidden state",
                        model.pooler.pooling_type)
            prefix_caching = False
        return Config(
            model=model,
            cache=CacheConfig(
                block_size=self.block_size, gpu_memory_utilization=self.gpu_memory_utilization,
                cpu_kv_cache_space=self.cpu_kv_cache_space,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                enable_prefix_caching=prefix_caching, swap_space=self.swap_space,
                kv_cache_dtype=self.kv_cache_dtype),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self._token_budget(model.max_model_len, model.device),
                enable_chunked_prefill=self.enable_chunked_prefill, preemption_mode=self.preemption_mode,
                max_num_waiting=self.max_num_waiting, recompute_kv_at=kv_recompute_length(model)),
            parallel=ParallelConfig(tensor_parallel_size=self.tensor_parallel_size),
            quantization=quantization_config(model.hf_config, self.quantization, model.path),
            disable_log_stats=self.disable_log_stats, structured_outputs_backend=self.structured_outputs_backend,
            structured_outputs_cache_mb=self.structured_outputs_cache_mb,
            structured_outputs_max_bytes=self.structured_outputs_max_bytes,
            structured_outputs_compile_timeout=self.structured_outputs_compile_timeout)

    def _token_budget(self, max_len: int, device: "torch.device") -> int:
        if self.max_num_batched_tokens is not None:
            budget = self.max_num_batched_tokens
            if not self.enable_chunked_prefill and budget < max_len:
                raise ConfigError(f"max_num_batched_tokens={budget} is smaller than max_model_len={max_len} "
                                  "with chunked prefill off: long prompts could never run. Raise it, or "
                                  "enable chunked prefill.")
            return budget
        default = 8192 if device.type == "cuda" else 2048
        return default if self.enable_chunked_prefill else max(default, max_len)


@dataclass
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    cpu_kv_cache_space: float
    num_gpu_blocks_override: int | None
    enable_prefix_caching: bool
    swap_space: float
    kv_cache_dtype: str


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int     # resolved: the per-step token budget
    enable_chunked_prefill: bool
    preemption_mode: str = "recompute"  # or "swap": keep the KV in host memory
    max_num_waiting: int | None = None  # beyond this the server answers 503
    # A sequence whose KV was computed while it held at most this many tokens recomputes it all when it
    # grows past (Phi-3 LongRoPE's switch of factor sets, as transformers does); None: never.
    recompute_kv_at: int | None = None


@dataclass
class ParallelConfig:
    tensor_parallel_size: int = 1


@dataclass
class Config:
    """The resolved tree, passed whole to the engine, executor, runner and loader."""

    model: "ModelConfig"
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    quantization: object | None = None  # QuantizationConfig: which linear method every layer uses
    disable_log_stats: bool = False
    structured_outputs_backend: str = "xgrammar"
    structured_outputs_cache_mb: float = 512.0
    structured_outputs_max_bytes: int = 65536
    structured_outputs_compile_timeout: float = 10.0

    @property
    def kv_cache_torch_dtype(self) -> "torch.dtype":
        """The KV pool's element type: the model's dtype, or e4m3 (one byte) for `--kv-cache-dtype fp8`."""
        import torch
        name = KV_CACHE_DTYPE_NAMES.get(self.cache.kv_cache_dtype)
        return self.model.dtype if name is None else getattr(torch, name)


def check_kv_cache_dtype(name: str) -> None:
    if name == "fp8_e5m2":
        raise ConfigError("kv_cache_dtype='fp8_e5m2' is not supported: use 'fp8' (e4m3, with per-tensor "
                          "scales from the checkpoint), or 'auto' (the model's dtype).")
    if name != "auto" and name not in KV_CACHE_DTYPE_NAMES:
        raise ConfigError(f"kv_cache_dtype={name!r} is not supported (supported: 'auto' (the model's "
                          f"dtype), {', '.join(repr(n) for n in KV_CACHE_DTYPE_NAMES)}).")


def resolve_device(device: str) -> "torch.device":
    import torch
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was asked for but torch sees no CUDA device.")
    return torch.device(device)


def resolve_dtype(dtype: str, checkpoint_dtype: "torch.dtype | None", device: "torch.device") -> "torch.dtype":
    """'auto' keeps a half-precision checkpoint's dtype on GPU, bf16 for fp32 ones, fp32 on CPU."""
    import torch
    if dtype != "auto":
        return getattr(torch, DTYPE_NAMES[dtype])
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype in (torch.float16, torch.bfloat16):
        return checkpoint_dtype
    return torch.bfloat16


def looks_like_path(model: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else that names the file system is meant as a path."""
    if model.startswith(("/", ".", "~")) or "\\" in model or model.count("/") > 1:
        return True
    head = model.split("/", 1)[0]
    return "/" in model and os.path.exists(head)


def check_local_path(model: str) -> None:
    """A path that does not exist fails in one line here, instead of as a hub id validation error later."""
    if looks_like_path(model) and not os.path.exists(os.path.expanduser(model)):
        raise ConfigError(f"Model path {model!r} does not exist.")


def resolve_checkpoint(model: str, revision: str | None = None) -> str:
    """A local directory is used as is; anything else is treated as a Hugging Face hub id."""
    if os.path.isdir(os.path.expanduser(model)):
        return os.path.expanduser(model)
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(model, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                 "*.tiktoken"])
    except Exception as exc:  # no network, unknown id, gated repo ...
        raise ConfigError(f"Could not find model {model!r}: it is not a local directory and the "
                          f"Hugging Face hub download failed ({type(exc).__name__}: {exc}). Pass the "
                          "path of a checkpoint directory (config.json + *.safetensors).") from exc
