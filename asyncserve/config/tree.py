"""The resolved config tree, passed whole to the engine, executor, runner and loader: every component reads
its fields where they live and keeps no copy."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from asyncserve.config.cache import KV_CACHE_DTYPE_NAMES, CacheConfig
from asyncserve.config.parallel import ParallelConfig
from asyncserve.config.scheduler import SchedulerConfig

if TYPE_CHECKING:
    import torch

    from asyncserve.config.model import ModelConfig


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
    speculative: object | None = None  # SpeculativeConfig (config/speculative.py); None: no speculation
    lora: object | None = None  # LoRAConfig (config/lora.py); None: LoRA off
    # Speculative decoding with a draft model: its checkpoint resolved as the target's (same dtype, device,
    # max_model_len, load format; engine/resolve_draft.py) and its own quantization. None: no draft model.
    draft_model: "ModelConfig | None" = None
    draft_quantization: object | None = None

    def draft_tree(self) -> "Config":
        """The tree the draft model is built and loaded from: the target's, with the draft's model part."""
        return replace(self, model=self.draft_model, quantization=self.draft_quantization, lora=None,
                       speculative=None, draft_model=None, draft_quantization=None)

    @property
    def ssm_state_torch_dtype(self) -> "torch.dtype":
        """Recurrent states' element type (`--mamba-ssm-cache-dtype`): the model's dtype unless set."""
        import torch
        name = self.cache.mamba_ssm_cache_dtype
        return self.model.dtype if name == "auto" else getattr(torch, name)

    @property
    def kv_cache_torch_dtype(self) -> "torch.dtype":
        """The KV pool's element type: the model's dtype, or e4m3 (one byte) for `--kv-cache-dtype fp8`."""
        import torch
        name = KV_CACHE_DTYPE_NAMES.get(self.cache.kv_cache_dtype)
        return self.model.dtype if name is None else getattr(torch, name)
