"""LoRA rows grouped by adapter (the SGMV shape for decode steps, inside CUDA graphs): each program takes one
adapter slot and walks the rows of that slot in tiles, so an adapter's A and B tiles are read once per step
instead of once per row (kernels/lora.py's per-row kernels), with tensor-core dots.

At batch 64 over 8 adapters of rank 16 on the 8B shape the per-row expand of gate/up reads each row's B
(2 x 14,336 x 16 bf16, 0.9 MB): 58 MB per layer, where grouping reads 7 MB. The groups are the rows sorted
by slot: `order` (row indices, the base model's rows first), `starts` and `counts` per slot, computed on the
device once per step from the step's slot table (`lora_slot_groups`), into buffers a CUDA graph reads; the
launch shape is (slots, slices, parts or column tiles) whatever the step's mix, so graphs capture it.

    shrink:  y[s, t, p] = x[t, part p] @ A[s][slot[t], :, part p].T   (fp32 partial sums over K, as lora.py)
    expand:  out[t, offset[s] : offset[s] + N[s]] += scale[slot[t]] * (sum_p y[s, t, p]) @ B[s][slot[t]].T
Rows of the base model (slot -1) are neither read nor written.
"""

import torch

from ._triton import next_power_of_2, tl, triton
from .lora import _device_ints, _pointers, shrink_partials

BLOCK_ROWS = 16  # rows per tile of a slot's group (tl.dot's smallest M)


def lora_slot_groups(slots: torch.Tensor, num_slots: int, order: torch.Tensor, starts: torch.Tensor,
                     counts: torch.Tensor) -> None:
    """Fills `order` [T] (row indices sorted by slot, stable; slot -1 first), `starts` and `counts` [num_slots]
    (where each slot's rows begin in `order`, how many) from `slots` [T]; on the device, without a sync."""
    keys = slots.to(torch.int64)
    order.copy_(torch.sort(keys, stable=True).indices)
    per_slot = (keys[:, None] == torch.arange(num_slots, device=slots.device)[None, :]).sum(dim=0)
    counts.copy_(per_slot)
    starts.copy_((keys < 0).sum() + torch.cumsum(per_slot, dim=0) - per_slot)


@triton.jit
def _shrink_grouped_kernel(x_ptr, a_ptr, order_ptr, starts_ptr, counts_ptr, y_ptr, k, rank, stride_xt, stride_al,
                           stride_ar, stride_ys, stride_yt, stride_yp, K_PER_PROGRAM: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    slot = tl.program_id(0)
    slice_index = tl.program_id(1)
    part = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    if count == 0:
        return
    start = tl.load(starts_ptr + slot)
    a_base = tl.load(a_ptr + slice_index).to(tl.pointer_type(x_ptr.dtype.element_ty)) + slot.to(tl.int64) * stride_al
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    for t0 in range(0, count, BLOCK_T):
        in_group = t0 + offs_t < count
        rows = tl.load(order_ptr + start + t0 + offs_t, mask=in_group, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K_PER_PROGRAM, BLOCK_K):
            offs_k = part * K_PER_PROGRAM + k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xt + offs_k[None, :],
                        mask=in_group[:, None] & (offs_k[None, :] < k), other=0.0)
            a = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None],
                        mask=(offs_r[None, :] < rank) & (offs_k[:, None] < k), other=0.0)  # [BLOCK_K, BLOCK_R]
            acc += tl.dot(x, a, input_precision=DOT_PRECISION)
        tl.store(y_ptr + slice_index * stride_ys + rows[:, None] * stride_yt + part * stride_yp + offs_r[None, :],
                 acc, mask=in_group[:, None] & (offs_r[None, :] < rank))


@triton.jit
def _expand_grouped_kernel(y_ptr, b_ptr, n_ptr, offset_ptr, order_ptr, starts_ptr, counts_ptr, scales_ptr, out_ptr,
                           rank, num_parts, stride_ys, stride_yt, stride_yp, stride_ot, BLOCK_T: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PARTS_PER_LOAD: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    slot = tl.program_id(0)
    slice_index = tl.program_id(1)
    block_n = tl.program_id(2)
    count = tl.load(counts_ptr + slot)
    n = tl.load(n_ptr + slice_index)
    if (count == 0) | (block_n * BLOCK_N >= n):
        return
    start = tl.load(starts_ptr + slot)
    b_base = tl.load(b_ptr + slice_index).to(tl.pointer_type(out_ptr.dtype.element_ty))
    offs_t = tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(b_base + slot.to(tl.int64) * n * rank + offs_n[None, :] * rank + offs_r[:, None],  # [BLOCK_R, BLOCK_N]
                mask=(offs_n[None, :] < n) & (offs_r[:, None] < rank), other=0.0).to(tl.float32)
    scale = tl.load(scales_ptr + slot).to(tl.float32)
    first_column = tl.load(offset_ptr + slice_index)
    for t0 in range(0, count, BLOCK_T):
        in_group = t0 + offs_t < count
        rows = tl.load(order_ptr + start + t0 + offs_t, mask=in_group, other=0).to(tl.int64)
        # The shrink's partial sums over K, PARTS_PER_LOAD at a time (one dependent load per part would make
        # the 56 parts of a 14,336-wide input a chain of loads), added in a fixed order.
        y = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
        offs_p = tl.arange(0, PARTS_PER_LOAD)
        for p0 in range(0, num_parts, PARTS_PER_LOAD):
            parts = p0 + offs_p
            y += tl.sum(tl.load(y_ptr + slice_index * stride_ys + rows[:, None, None] * stride_yt
                                + parts[None, :, None] * stride_yp + offs_r[None, None, :],
                                mask=in_group[:, None, None] & (parts[None, :, None] < num_parts)
                                & (offs_r[None, None, :] < rank), other=0.0), axis=1)
        delta = tl.dot(y, b, input_precision=DOT_PRECISION) * scale
        mask = in_group[:, None] & (offs_n[None, :] < n)
        out = out_ptr + rows[:, None] * stride_ot + first_column + offs_n[None, :]
        current = tl.load(out, mask=mask, other=0.0).to(tl.float32)
        tl.store(out, (current + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 models keep fp32 products (token-exact tests); others take TF32 for the fp32 partial sums."""
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink_grouped(x, a_slices, order, starts, counts):
    """`lora_shrink_triton` over the slots' groups: y [S, T, P, r] fp32, written for rows with an adapter."""
    num_tokens, k = x.shape
    rank = a_slices[0].shape[1]
    num_slots = a_slices[0].shape[0]
    y, block_k, k_per_program = shrink_partials(x, a_slices, max_block_k=64)  # tl.dot tiles of [16, 64] x [64, r]
    num_parts = y.shape[2]
    if num_tokens:
        a0 = a_slices[0]
        _shrink_grouped_kernel[(num_slots, len(a_slices), num_parts)](
            x, _pointers(a_slices, x.device), order, starts, counts, y, k, rank, x.stride(0), a0.stride(0),
            a0.stride(1), y.stride(0), y.stride(1), y.stride(2), K_PER_PROGRAM=k_per_program, BLOCK_T=BLOCK_ROWS,
            BLOCK_R=max(16, next_power_of_2(rank)), BLOCK_K=block_k, DOT_PRECISION=_dot_precision(x.dtype))
    return y


def lora_expand_grouped(y, b_slices, order, starts, counts, scales, out, offsets):
    """`lora_expand_triton` over the slots' groups: adds each adapter row's delta to `out` in place."""
    num_slices, num_tokens, num_parts, rank = y.shape
    assert all(b.shape[2] == rank and b.is_contiguous() and b.dtype == out.dtype for b in b_slices), \
        "every slice's B must be a contiguous [L, N_s, r], in out's dtype"
    if num_tokens:
        widths = [b.shape[1] for b in b_slices]
        block_n = min(128, max(16, next_power_of_2(max(widths))))
        grid = (b_slices[0].shape[0], num_slices, triton.cdiv(max(widths), block_n))
        _expand_grouped_kernel[grid](
            y, _pointers(b_slices, y.device), _device_ints(tuple(widths), torch.int32, y.device),
            _device_ints(tuple(offsets), torch.int32, y.device), order, starts, counts, scales, out, rank,
            num_parts, y.stride(0), y.stride(1), y.stride(2), out.stride(0), BLOCK_T=BLOCK_ROWS,
            BLOCK_R=max(16, next_power_of_2(rank)), BLOCK_N=block_n,
            PARTS_PER_LOAD=min(8, max(2, next_power_of_2(num_parts))), DOT_PRECISION=_dot_precision(out.dtype))
    return out
