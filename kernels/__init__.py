"""Kernels of asyncserve: each op comes as `op_ref` (pure torch, any device and float dtype),
`op_triton` (Triton; runs on CPU tensors under TRITON_INTERPRET=1) and `op` (Triton for CUDA
tensors when triton is installed, the reference otherwise). Ops on the decode path of the CPU also
come as `op_cpu` (fewer, fused torch ops with the reference's contract), which `op` takes for CPU tensors.

KV pool layout, fixed for the whole engine: per layer k_cache and v_cache
`[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous;
slot = block_id * block_size + offset.
"""

if __name__ != "asyncserve.kernels":
    # Found as the top-level name "kernels": the repository root is on sys.path (`python -m pytest`, a
    # script or a worker process started there). That name belongs to another distribution (Hugging
    # Face's kernels, which transformers imports), so this folder steps aside for it.
    from importlib.machinery import PathFinder as _PathFinder
    from importlib.util import module_from_spec as _module_from_spec
    import os as _os
    import sys as _sys

    def _step_aside(name: str, repository_root: str) -> None:
        """Load the installed distribution of `name` from sys.path without the repository root."""
        root = _os.path.realpath(repository_root)
        elsewhere = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != root]
        spec = _PathFinder.find_spec(name, elsewhere)
        if spec is None or spec.loader is None:
            # None installed: stay an empty placeholder that reads as a namespace-package shadow (no
            # __file__, no version), which transformers' availability check counts as absent, where an
            # ImportError here would escape that check and break `import transformers.models...`.
            # `from kernels import anything` still raises ImportError.
            module = _sys.modules[name]
            module.__file__ = None
            module.__path__ = []
            return
        module = _module_from_spec(spec)
        _sys.modules[name] = module  # the import that led here returns what sys.modules holds now
        spec.loader.exec_module(module)

    _step_aside(__name__, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
else:
    from ._triton import HAS_TRITON, use_triton
    from .activation import (
        gelu_tanh_and_mul,
        gelu_tanh_and_mul_ref,
        gelu_tanh_and_mul_triton,
        silu_and_mul,
        silu_and_mul_ref,
        silu_and_mul_triton,
        swiglu_oai_and_mul,
        swiglu_oai_and_mul_ref,
        swiglu_oai_and_mul_triton,
    )
    from .attention import (
        paged_attention,
        paged_attention_ref,
        paged_attention_triton,
        paged_decode_attention,
        paged_decode_attention_cpu,
        paged_decode_attention_ref,
        paged_decode_attention_triton,
        paged_prefill_attention,
        paged_prefill_attention_ref,
        paged_prefill_attention_triton,
    )
    from .bitmask import apply_token_bitmask, apply_token_bitmask_ref, apply_token_bitmask_triton
    from .cache import write_kv_cache, write_kv_cache_cpu, write_kv_cache_ref, write_kv_cache_triton
    from .gemv import GEMV_ACTIVATIONS, GEMV_CONFIGS, gemv_normed_ref, gemv_normed_triton, gemv_ref, gemv_triton
    from .moe import (
        fused_moe,
        fused_moe_ref,
        fused_moe_triton,
        moe_align_block_size_ref,
        moe_align_block_size_triton,
        select_experts_triton,
        select_experts,
    )
    from .quant_experts import QuantExperts
    from .moe_tiles import MOE_CONFIGS, GemmTiles, MoeTiles, max_padded_entries
    from .norm import (
        fused_add_rms_norm,
        fused_add_rms_norm_ref,
        fused_add_rms_norm_triton,
        rms_norm,
        rms_norm_ref,
        rms_norm_triton,
    )
    from .int_packing import QUANT_BITS, dequantize_int_rows, pack_int_rows, unpack_int_rows
    from .quant_gemm import (
        DEQUANT_MIN_ROWS,
        GEMV_MAX_ROWS,
        QUANT_GEMM_CONFIGS,
        QUANT_GEMV_CONFIGS,
        QUANT_GEMV_TIMED,
        dequantize_triton,
        quant_gemm,
        quant_gemm_ref,
        quant_gemm_triton,
        gemv_table_config,
        quant_gemv_triton,
        reserve_dequant_scratch,
    )
    from .quant_gemv_mma import MMA_TILE_ROWS, MmaGemvConfig, mma_applies, quant_gemm_mma
    from .split_k import SPLIT_K_MAX_ROWS, reserve_split_k_workspace
    from .rotary import rotary_embedding, rotary_embedding_ref, rotary_embedding_triton
    from .rotary_cache import rotary_write_kv_cache, rotary_write_kv_cache_ref, rotary_write_kv_cache_triton

    __all__ = [
        "HAS_TRITON", "use_triton", "apply_token_bitmask", "apply_token_bitmask_ref", "apply_token_bitmask_triton",
        "GEMV_ACTIVATIONS", "GEMV_CONFIGS", "gemv_normed_ref", "gemv_normed_triton", "gemv_ref", "gemv_triton",
        "fused_add_rms_norm", "fused_add_rms_norm_ref", "fused_add_rms_norm_triton",
        "gelu_tanh_and_mul", "gelu_tanh_and_mul_ref", "gelu_tanh_and_mul_triton",
        "paged_attention", "paged_attention_ref", "paged_attention_triton",
        "paged_decode_attention", "paged_decode_attention_cpu", "paged_decode_attention_ref",
        "paged_decode_attention_triton",
        "paged_prefill_attention", "paged_prefill_attention_ref", "paged_prefill_attention_triton",
        "DEQUANT_MIN_ROWS", "GEMV_MAX_ROWS", "QUANT_BITS", "QUANT_GEMM_CONFIGS", "QUANT_GEMV_CONFIGS",
        "QUANT_GEMV_TIMED", "SPLIT_K_MAX_ROWS", "dequantize_int_rows", "dequantize_triton", "gemv_table_config", "pack_int_rows",
        "reserve_dequant_scratch", "reserve_split_k_workspace",
        "unpack_int_rows",
        "quant_gemm", "quant_gemm_ref", "quant_gemm_triton", "quant_gemv_triton",
        "MMA_TILE_ROWS", "MmaGemvConfig", "mma_applies", "quant_gemm_mma",
        "GemmTiles", "MOE_CONFIGS", "MoeTiles", "QuantExperts", "fused_moe", "fused_moe_ref", "fused_moe_triton", "max_padded_entries",
        "moe_align_block_size_ref", "moe_align_block_size_triton", "select_experts", "select_experts_triton",
        "rms_norm", "rms_norm_ref", "rms_norm_triton",
        "rotary_embedding", "rotary_embedding_ref", "rotary_embedding_triton",
        "rotary_write_kv_cache", "rotary_write_kv_cache_ref", "rotary_write_kv_cache_triton",
        "silu_and_mul", "silu_and_mul_ref", "silu_and_mul_triton",
        "swiglu_oai_and_mul", "swiglu_oai_and_mul_ref", "swiglu_oai_and_mul_triton",
        "write_kv_cache", "write_kv_cache_cpu", "write_kv_cache_ref", "write_kv_cache_triton",
    ]
