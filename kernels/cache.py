"""Writes the new tokens' keys and values into the paged KV pool.

Pool layout (per layer): k_cache, v_cache `[num_blocks, block_size, num_kv_heads, head_dim]`,
contiguous; a token's slot is `block_id * block_size + offset`. Slots < 0 mark padding
tokens (CUDA-graph batches) and are skipped. An fp8 pool stores saturate(x / scale) (kv_scale.py).
"""

from ._triton import tl, triton, use_triton, next_power_of_2
from .kv_scale import FP8_KV_MAX, _is_one, is_fp8, quantize_kv_ref, scale_operands


def write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    """key/value [T, Hkv, D] -> k_cache/v_cache at slot_mapping [T] (in place)."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = quantize_kv_ref(key[valid], k_scale, k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = quantize_kv_ref(value[valid], v_scale, v_cache.dtype)


@triton.jit
def _to_cache(x, scale_ptr, HAS_SCALES: tl.constexpr, SATURATE: tl.constexpr, FP8_MAX: tl.constexpr):
    """x / scale, saturated to e4m3's range for an fp8 pool (as quantize_kv_ref)."""
    if HAS_SCALES:
        x = x.to(tl.float32) / tl.load(scale_ptr)
    if SATURATE:
        x = tl.minimum(tl.maximum(x.to(tl.float32), -FP8_MAX), FP8_MAX)
    return x


@triton.jit
def _write_kv_cache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_key_t, stride_key_h, stride_value_t, stride_value_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    HAS_SCALES: tl.constexpr, SATURATE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    # One program per token: all its heads in one [HEADS_PAD, HEAD_DIM_PAD] tile.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return  # padding token
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
    key = tl.load(key_ptr + token * stride_key_t + heads * stride_key_h + dims, mask=mask)
    key = _to_cache(key, k_scale_ptr, HAS_SCALES, SATURATE, FP8_MAX)
    tl.store(k_cache_ptr + cache_offsets, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    value = tl.load(value_ptr + token * stride_value_t + heads * stride_value_h + dims, mask=mask)
    value = _to_cache(value, v_scale_ptr, HAS_SCALES, SATURATE, FP8_MAX)
    tl.store(v_cache_ptr + cache_offsets, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache_triton(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    """Triton version of `write_kv_cache_ref`; key/value may be strided views of a fused qkv."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    heads_pad, dim_pad = next_power_of_2(num_kv_heads), next_power_of_2(head_dim)
    k_scale, v_scale, has_scales = scale_operands(k_scale, v_scale, key)
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=heads_pad, HEAD_DIM_PAD=dim_pad,
        HAS_SCALES=has_scales, SATURATE=is_fp8(k_cache.dtype), FP8_MAX=FP8_KV_MAX,
        num_warps=4 if heads_pad * dim_pad <= 2048 else 8,
    )


def write_kv_cache_cpu(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    """`write_kv_cache_ref` for CPU tensors: two row copies when no token is padding (on the CPU, reading
    the slots costs no device sync), instead of the reference's masks and gathers; the reference else."""
    plain = not is_fp8(k_cache.dtype) and _is_one(k_scale) and _is_one(v_scale)
    if not plain or not bool((slot_mapping >= 0).all()):
        return write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.long()
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, value.to(v_cache.dtype))


def write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale=1.0, v_scale=1.0):
    """Triton on CUDA, the CPU version on the CPU, torch reference elsewhere."""
    if use_triton(key):
        write = write_kv_cache_triton
    elif key.device.type == "cpu":
        write = write_kv_cache_cpu
    else:
        write = write_kv_cache_ref
    return write(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
