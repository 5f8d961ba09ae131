"""The KV cache's part of the config tree: blocks, memory share, prefix caching, swap, element type."""
from __future__ import annotations

from dataclasses import dataclass

from asyncserve.errors import ConfigError

# --kv-cache-dtype names (vLLM's) -> the pool's torch dtype name; "auto" is the model's dtype.
KV_CACHE_DTYPE_NAMES = {"fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn"}
# --mamba-ssm-cache-dtype (vLLM's): the element type of linear-attention layers' recurrent states; "auto" is
# the model's dtype, as vLLM has it (a 27B hybrid's fp32 states take 151 MB per sequence, bf16 half that).
SSM_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class CacheConfig:
    block_size: int
    gpu_memory_utilization: float
    cpu_kv_cache_space: float
    num_gpu_blocks_override: int | None
    enable_prefix_caching: bool
    swap_space: float
    kv_cache_dtype: str
    # Slots of the per-sequence state pool (hybrid models' linear-attention layers): one per sequence that
    # may run at once (max_num_seqs); 0 for models without such layers.
    num_state_slots: int = 0
    mamba_ssm_cache_dtype: str = "auto"


def check_kv_cache_dtype(name: str) -> None:
    if name == "fp8_e5m2":
        raise ConfigError("kv_cache_dtype='fp8_e5m2' is not supported: use 'fp8' (e4m3, with per-tensor "
                          "scales from the checkpoint), or 'auto' (the model's dtype).")
    if name != "auto" and name not in KV_CACHE_DTYPE_NAMES:
        raise ConfigError(f"kv_cache_dtype={name!r} is not supported (supported: 'auto' (the model's "
                          f"dtype), {', '.join(repr(n) for n in KV_CACHE_DTYPE_NAMES)}).")


def check_mamba_ssm_cache_dtype(name: str) -> None:
    if name not in SSM_CACHE_DTYPES:
        raise ConfigError(f"mamba_ssm_cache_dtype={name!r} is not supported (supported: "
                          f"{', '.join(repr(n) for n in SSM_CACHE_DTYPES)}; 'auto' is the model's dtype).")
