"""Kernels of asyncserve: each op comes as `op_ref` (pure torch, any device and float dtype),
`op_triton` (Triton; runs on CPU tensors under TRITON_INTERPRET=1) and `op` (Triton for CUDA
tensors when triton is installed, the reference otherwise).

KV pool layout, fixed for the whole engine: per layer k_cache and v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous;
slot = block_id * block_size + offset.
"""

from ._triton import HAS_TRITON
from .activation import silu_and_mul, silu_and_mul_ref, silu_and_mul_triton
from .attention import (
    paged_attention,
    paged_attention_ref,
    paged_attention_triton,
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_triton,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    paged_prefill_attention_triton,
)
from .bitmask import apply_token_bitmask, apply_token_bitmask_ref, apply_token_bitmask_triton
from .cache import write_kv_cache, write_kv_cache_ref, write_kv_cache_triton
from .gemv import GEMV_CONFIGS, gemv_ref, gemv_triton
from .norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    fused_add_rms_norm_triton,
    rms_norm,
    rms_norm_ref,
    rms_norm_triton,
)
from .quant_gemm import (
    GEMV_MAX_ROWS,
    QUANT_BITS,
    QUANT_GEMM_CONFIGS,
    QUANT_GEMV_CONFIGS,
    dequantize_int_rows,
    pack_int_rows,
    quant_gemm,
    quant_gemm_ref,
    quant_gemm_triton,
    quant_gemv_triton,
    unpack_int_rows,
)
from .rotary import rotary_embedding, rotary_embedding_ref, rotary_embedding_triton

__all__ = [
    "HAS_TRITON", "apply_token_bitmask", "apply_token_bitmask_ref", "apply_token_bitmask_triton",
    "GEMV_CONFIGS", "gemv_ref", "gemv_triton",
    "fused_add_rms_norm", "fused_add_rms_norm_ref", "fused_add_rms_norm_triton",
    "paged_attention", "paged_attention_ref", "paged_attention_triton",
    "paged_decode_attention", "paged_decode_attention_ref", "paged_decode_attention_triton",
    "paged_prefill_attention", "paged_prefill_attention_ref", "paged_prefill_attention_triton",
    "GEMV_MAX_ROWS", "QUANT_BITS", "QUANT_GEMM_CONFIGS", "QUANT_GEMV_CONFIGS",
    "dequantize_int_rows", "pack_int_rows", "unpack_int_rows",
    "quant_gemm", "quant_gemm_ref", "quant_gemm_triton", "quant_gemv_triton",
    "rms_norm", "rms_norm_ref", "rms_norm_triton",
    "rotary_embedding", "rotary_embedding_ref", "rotary_embedding_triton",
    "silu_and_mul", "silu_and_mul_ref", "silu_and_mul_triton",
    "write_kv_cache", "write_kv_cache_ref", "write_kv_cache_triton",
]
