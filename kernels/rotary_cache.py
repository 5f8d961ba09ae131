"""Rotary embedding and the KV-cache write in one launch: each attention layer's two smallest kernels.

At batch 1 a layer's rotary and cache write each move a few hundred bytes and cost a launch (1-2 µs
in a CUDA graph); fused, one program per token reads its cos/sin row once, rotates the query heads in
place, rotates the key heads in registers (stored back in place too, as the separate ops leave them) and
writes the rotated key and the value to the pool at the token's slot (-1: padding, nothing written).
The result is bit for bit that of `rotary_embedding` then `write_kv_cache`: the rotated key is rounded
to the key's dtype before an fp8 pool's scale and saturation, as the two ops do. Given per-head norm weights
(Qwen3's q_norm / k_norm, full rotary), each head is RMSNormed first, with the norm kernel's roundings: one
launch where there were three.
Inputs are [T, heads, head_dim] (strided views of a fused qkv); the table's width (rotary_dim) may be
less than head_dim (partial rotary: the tail of each head is written as it is).
"""

from ._triton import tl, triton, use_triton, next_power_of_2
from .cache import _to_cache, write_kv_cache, write_kv_cache_ref
from .kv_scale import FP8_KV_MAX, is_fp8, scale_operands
from .norm import rms_norm, rms_norm_ref
from .rotary import _rotate_heads, norm_head_halves, rotary_embedding, rotary_embedding_ref


def _check_head_norms(qk_norm, query, cos_sin_cache) -> None:
    if qk_norm is not None and cos_sin_cache.shape[-1] != query.shape[-1]:
        raise ValueError(f"per-head norms with the rotary take full rotary only (rotary_dim "
                         f"{cos_sin_cache.shape[-1]}, head_dim {query.shape[-1]})")


def _norm_heads_in_place(norm, query, key, qk_norm) -> None:
    q_weight, k_weight, eps = qk_norm
    query.copy_(norm(query, q_weight, eps))
    key.copy_(norm(key, k_weight, eps))


def rotary_write_kv_cache_ref(positions, query, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache,
                              is_neox, k_scale=1.0, v_scale=1.0, qk_norm=None):
    """positions [T]; query [T, H, D], key/value [T, Hkv, D]: q and k rotated in place, then k and v
    written at slot_mapping [T] (as rotary_embedding_ref then write_kv_cache_ref). `qk_norm` (q weight [D],
    k weight [D], eps): each head RMSNormed first, in place (Qwen3's q_norm / k_norm), full rotary only."""
    _check_head_norms(qk_norm, query, cos_sin_cache)
    if qk_norm is not None:
        _norm_heads_in_place(rms_norm_ref, query, key, qk_norm)
    rotary_embedding_ref(positions, query, key, cos_sin_cache, is_neox)
    write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@triton.jit
def _rotary_cache_kernel(
    positions_ptr, query_ptr, key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    cos_sin_ptr, k_scale_ptr, v_scale_ptr, q_norm_ptr, k_norm_ptr, eps,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos_sin, num_heads,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, TAIL_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
    HAS_SCALES: tl.constexpr, SATURATE: tl.constexpr, FP8_MAX: tl.constexpr, QK_NORM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_PAD)[None, :]
    cos_sin_row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(cos_sin_row + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_row + HALF + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    _rotate_heads(query_ptr, stride_qt, stride_qh, token, num_heads, cos, sin,
                  HEADS_PAD, HALF, HALF_PAD, IS_NEOX, q_norm_ptr, eps, QK_NORM)

    # The key: rotated in registers, stored in place, and (below) straight from registers to the pool.
    heads = tl.arange(0, KV_HEADS_PAD)[:, None]
    mask = (heads < NUM_KV_HEADS) & (pairs < HALF)
    if IS_NEOX:
        first_dims, second_dims = pairs, pairs + HALF
    else:
        first_dims, second_dims = 2 * pairs, 2 * pairs + 1
    key_row = key_ptr + token * stride_kt + heads * stride_kh
    x1 = tl.load(key_row + first_dims, mask=mask, other=0.0)
    x2 = tl.load(key_row + second_dims, mask=mask, other=0.0)
    first, second = x1.to(tl.float32), x2.to(tl.float32)
    if QK_NORM:
        first, second = norm_head_halves(first, second, x1.dtype, k_norm_ptr, first_dims, second_dims,
                                         pairs < HALF, eps, HEAD_DIM)
    rotated_first = (first * cos - second * sin).to(x1.dtype)
    rotated_second = (second * cos + first * sin).to(x1.dtype)
    tl.store(key_row + first_dims, rotated_first, mask=mask)
    tl.store(key_row + second_dims, rotated_second, mask=mask)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return  # padding token: rotated, never stored
    cache_dtype = k_cache_ptr.dtype.element_ty
    cache_row = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM
    tl.store(k_cache_ptr + cache_row + first_dims,
             _to_cache(rotated_first, k_scale_ptr, HAS_SCALES, SATURATE, FP8_MAX).to(cache_dtype), mask=mask)
    tl.store(k_cache_ptr + cache_row + second_dims,
             _to_cache(rotated_second, k_scale_ptr, HAS_SCALES, SATURATE, FP8_MAX).to(cache_dtype), mask=mask)
    if TAIL_PAD > 0:  # partial rotary: the dims past rotary_dim go to the pool unrotated
        tail = 2 * HALF + tl.arange(0, TAIL_PAD)[None, :]
        tail_mask = (heads < NUM_KV_HEADS) & (tail < HEAD_DIM)
        key_tail = tl.load(key_row + tail, mask=tail_mask)
        tl.store(k_cache_ptr + cache_row + tail,
                 _to_cache(key_tail, k_scale_ptr, HAS_SCALES, SATURATE, FP8_MAX).to(cache_dtype), mask=tail_mask)
    dims = tl.arange(0, HEAD_DIM_PAD)[None, :]
    value_mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=value_mask)
    tl.store(v_cache_ptr + cache_row + dims,
             _to_cache(value, v_scale_ptr, HAS_SCALES, SATURATE, FP8_MAX).to(v_cache_ptr.dtype.element_ty),
             mask=value_mask)


def rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache,
                                 is_neox, k_scale=1.0, v_scale=1.0, qk_norm=None):
    """Triton version of `rotary_write_kv_cache_ref`: one program per token."""
    _check_head_norms(qk_norm, query, cos_sin_cache)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    rotary_dim = cos_sin_cache.shape[-1]
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin_cache.stride(-1) == 1
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim and k_cache.shape[2:] == (num_kv_heads, head_dim)
    if num_tokens == 0:
        return
    half = rotary_dim // 2
    heads_pad, dim_pad = next_power_of_2(num_heads), next_power_of_2(head_dim)
    tail = head_dim - rotary_dim
    k_scale, v_scale, has_scales = scale_operands(k_scale, v_scale, query)
    q_norm, k_norm, eps = qk_norm if qk_norm is not None else (query, key, 0.0)
    _rotary_cache_kernel[(num_tokens,)](
        positions, query, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache, k_scale, v_scale,
        q_norm, k_norm, float(eps), query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos_sin_cache.stride(0), num_heads,
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=dim_pad,
        HALF=half, HALF_PAD=next_power_of_2(half), TAIL_PAD=next_power_of_2(tail) if tail else 0,
        HEADS_PAD=heads_pad, KV_HEADS_PAD=next_power_of_2(num_kv_heads), IS_NEOX=is_neox,
        HAS_SCALES=has_scales, SATURATE=is_fp8(k_cache.dtype), FP8_MAX=FP8_KV_MAX, QK_NORM=qk_norm is not None,
        num_warps=4 if heads_pad * half <= 4096 else 8,
    )


def rotary_write_kv_cache(positions, query, key, value, k_cache, v_cache, slot_mapping, cos_sin_cache,
                          is_neox, k_scale=1.0, v_scale=1.0, qk_norm=None):
    """One Triton launch on CUDA; elsewhere the ops' own dispatchers (the CPU versions, the references)."""
    if use_triton(query):
        return rotary_write_kv_cache_triton(positions, query, key, value, k_cache, v_cache, slot_mapping,
                                            cos_sin_cache, is_neox, k_scale, v_scale, qk_norm)
    _check_head_norms(qk_norm, query, cos_sin_cache)
    if qk_norm is not None:
        _norm_heads_in_place(rms_norm, query, key, qk_norm)
    rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    write_kv_cache(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
