"""Rotary position embedding, applied in place to query and key.

cos_sin_cache [max_position, rotary_dim] holds cos in its first half and sin in its second.
Neox style rotates the halves (x[:r/2], x[r/2:r]), GPT-J style the interleaved pairs. A 3-D
[T, heads, D] input may have rotary_dim < D (the tail stays as is); a 2-D [T, heads * D]
input is read with D = rotary_dim.
"""

from ._triton import tl, triton, use_triton, next_power_of_2


def _as_heads(x, head_dim):
    return x if x.dim() == 3 else x.view(x.shape[0], -1, head_dim)


def _rotate_ref(x, cos, sin, is_neox):
    """x [T, heads, D] in place; cos/sin [T, 1, rotary_dim / 2] fp32."""
    half = cos.shape[-1]
    if is_neox:
        x1, x2 = x[..., :half], x[..., half:2 * half]
    else:
        x1, x2 = x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    first, second = x1.float(), x2.float()
    rotated_first = first * cos - second * sin
    rotated_second = second * cos + first * sin
    x1.copy_(rotated_first)
    x2.copy_(rotated_second)


def rotary_embedding_ref(positions, query, key, cos_sin_cache, is_neox):
    """positions [T]; query [T, H*D] or [T, H, D]; key likewise with Hkv -> (query, key) rotated."""
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    cos_sin = cos_sin_cache[positions.long()].float()  # [T, rotary_dim]
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    _rotate_ref(_as_heads(query, rotary_dim), cos, sin, is_neox)
    _rotate_ref(_as_heads(key, rotary_dim), cos, sin, is_neox)
    return query, key


@triton.jit
def norm_head_halves(first, second, dtype: tl.constexpr, norm_w_ptr, first_dims, second_dims, dims_mask, eps,
                     HEAD_DIM: tl.constexpr):
    """Each head's RMSNorm with `rms_norm_ref`'s roundings (normalized, rounded to `dtype`, times the weight,
    rounded), for heads held as their two rotary halves [heads, HALF_PAD] in fp32 (full rotary: the halves
    are the whole head). Returns the halves in fp32, each value one of `dtype`."""
    inv_rms = 1.0 / tl.sqrt((tl.sum(first * first, axis=1) + tl.sum(second * second, axis=1)) / HEAD_DIM + eps)
    inv_rms = inv_rms[:, None]
    w1 = tl.load(norm_w_ptr + first_dims, mask=dims_mask, other=0.0).to(tl.float32)
    w2 = tl.load(norm_w_ptr + second_dims, mask=dims_mask, other=0.0).to(tl.float32)
    first = ((first * inv_rms).to(dtype).to(tl.float32) * w1).to(dtype).to(tl.float32)
    second = ((second * inv_rms).to(dtype).to(tl.float32) * w2).to(dtype).to(tl.float32)
    return first, second


@triton.jit
def _rotate_heads(x_ptr, stride_t, stride_h, token, num_heads, cos, sin,
                  HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr,
                  IS_NEOX: tl.constexpr, norm_w_ptr, eps, NORM: tl.constexpr):
    """The heads of one token rotated in place (NORM: each head's RMSNorm by `norm_w_ptr` first)."""
    heads = tl.arange(0, HEADS_PAD)[:, None]
    pairs = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (pairs < HALF)
    if IS_NEOX:
        first_dims, second_dims = pairs, pairs + HALF
    else:
        first_dims, second_dims = 2 * pairs, 2 * pairs + 1
    row = x_ptr + token * stride_t + heads * stride_h
    x1 = tl.load(row + first_dims, mask=mask, other=0.0)
    x2 = tl.load(row + second_dims, mask=mask, other=0.0)
    first, second = x1.to(tl.float32), x2.to(tl.float32)
    if NORM:
        first, second = norm_head_halves(first, second, x1.dtype, norm_w_ptr, first_dims, second_dims,
                                         pairs < HALF, eps, 2 * HALF)
    tl.store(row + first_dims, (first * cos - second * sin).to(x1.dtype), mask=mask)
    tl.store(row + second_dims, (second * cos + first * sin).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(positions_ptr, query_ptr, key_ptr, cos_sin_ptr,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cos_sin,
                   num_heads, num_kv_heads,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr,
                   KV_HEADS_PAD: tl.constexpr, IS_NEOX: tl.constexpr):
    # One program per token: its cos/sin row is read once for all query and key heads.
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_PAD)[None, :]
    cos_sin_row = cos_sin_ptr + position * stride_cos_sin
    cos = tl.load(cos_sin_row + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_row + HALF + pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    _rotate_heads(query_ptr, stride_qt, stride_qh, token, num_heads, cos, sin,
                  HEADS_PAD, HALF, HALF_PAD, IS_NEOX, query_ptr, 0.0, False)
    _rotate_heads(key_ptr, stride_kt, stride_kh, token, num_kv_heads, cos, sin,
                  KV_HEADS_PAD, HALF, HALF_PAD, IS_NEOX, key_ptr, 0.0, False)


def rotary_embedding_triton(positions, query, key, cos_sin_cache, is_neox):
    """Triton version of `rotary_embedding_ref` (in place; inputs may be strided views)."""
    rotary_dim = cos_sin_cache.shape[-1]
    query3d, key3d = _as_heads(query, rotary_dim), _as_heads(key, rotary_dim)
    assert query3d.stride(-1) == 1 and key3d.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    num_tokens = positions.shape[0]
    if num_tokens == 0:
        return query, key
    half = rotary_dim // 2
    heads_pad = next_power_of_2(query3d.shape[1])
    _rotary_kernel[(num_tokens,)](
        positions, query3d, key3d, cos_sin_cache,
        query3d.stride(0), query3d.stride(1), key3d.stride(0), key3d.stride(1),
        cos_sin_cache.stride(0), query3d.shape[1], key3d.shape[1],
        HALF=half, HALF_PAD=next_power_of_2(half), HEADS_PAD=heads_pad,
        KV_HEADS_PAD=next_power_of_2(key3d.shape[1]), IS_NEOX=is_neox,
        num_warps=4 if heads_pad * half <= 4096 else 8,
    )
    return query, key


def rotary_embedding(positions, query, key, cos_sin_cache, is_neox):
    """Triton on CUDA, torch reference elsewhere."""
    rotate = rotary_embedding_triton if use_triton(query) else rotary_embedding_ref
    return rotate(positions, query, key, cos_sin_cache, is_neox)
