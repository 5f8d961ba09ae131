"""LoRA over prompt chunks (the SGMV shape): a sequence's rows are contiguous and share one adapter, so its
rows are cut into chunks of up to `CHUNK_ROWS` and each chunk multiplies a tile of rows by its adapter's A
(then B) with tensor-core dots, reading each adapter tile once per chunk instead of once per row as the
per-row kernels of kernels/lora.py do. The runner builds the chunk table on the host per eager step:
[num_chunks, 3] int64 of (first row, rows, slot); rows outside every chunk (the base model's) are untouched.
CUDA graphs keep the per-row kernels, whose launch shape does not depend on the step.
"""

import torch

from ._triton import next_power_of_2, tl, triton
from .lora import _device_ints, _pointers

CHUNK_ROWS = 32


def lora_chunks(rows: list[tuple[int, int, int]]) -> list[int]:
    """(first row, rows, slot) per sequence with an adapter -> the flat chunk table, CHUNK_ROWS at most each."""
    table = []
    for start, count, slot in rows:
        for offset in range(0, count, CHUNK_ROWS):
            table += [start + offset, min(CHUNK_ROWS, count - offset), slot]
    return table


@triton.jit
def _shrink_chunks_kernel(x_ptr, a_ptr, chunks_ptr, y_ptr, k, rank, stride_xt, stride_al, stride_ar, stride_ys,
                          stride_yt, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    chunk = tl.program_id(0)
    slice_index = tl.program_id(1)
    first = tl.load(chunks_ptr + chunk * 3)
    count = tl.load(chunks_ptr + chunk * 3 + 1)
    slot = tl.load(chunks_ptr + chunk * 3 + 2).to(tl.int64)
    a_base = tl.load(a_ptr + slice_index).to(tl.pointer_type(x_ptr.dtype.element_ty))
    rows = tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + (first + rows)[:, None] * stride_xt + offs_k[None, :],
                    mask=(rows[:, None] < count) & (offs_k[None, :] < k), other=0.0)
        a = tl.load(a_base + slot * stride_al + offs_r[None, :] * stride_ar + offs_k[:, None],
                    mask=(offs_r[None, :] < rank) & (offs_k[:, None] < k), other=0.0)
        acc += tl.dot(x, a.to(x.dtype))
    out = y_ptr + slice_index * stride_ys + (first + rows)[:, None] * stride_yt + offs_r[None, :]
    tl.store(out, acc, mask=(rows[:, None] < count) & (offs_r[None, :] < rank))


@triton.jit
def _expand_chunks_kernel(y_ptr, b_ptr, n_ptr, offset_ptr, chunks_ptr, scales_ptr, out_ptr, rank, stride_ys,
                          stride_yt, stride_ot, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_N: tl.constexpr):
    chunk = tl.program_id(0)
    slice_index = tl.program_id(1)
    block_n = tl.program_id(2)
    n = tl.load(n_ptr + slice_index)
    if block_n * BLOCK_N >= n:
        return
    first = tl.load(chunks_ptr + chunk * 3)
    count = tl.load(chunks_ptr + chunk * 3 + 1)
    slot = tl.load(chunks_ptr + chunk * 3 + 2).to(tl.int64)
    b_base = tl.load(b_ptr + slice_index).to(tl.pointer_type(out_ptr.dtype.element_ty))
    rows = tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y = tl.load(y_ptr + slice_index * stride_ys + (first + rows)[:, None] * stride_yt + offs_r[None, :],
                mask=(rows[:, None] < count) & (offs_r[None, :] < rank), other=0.0)
    b = tl.load(b_base + slot * n * rank + offs_n[None, :] * rank + offs_r[:, None],  # contiguous [L, N_s, r]
                mask=(offs_n[None, :] < n) & (offs_r[:, None] < rank), other=0.0).to(tl.float32)
    delta = tl.dot(y, b) * tl.load(scales_ptr + slot).to(tl.float32)
    mask = (rows[:, None] < count) & (offs_n[None, :] < n)
    out = out_ptr + (first + rows)[:, None] * stride_ot + tl.load(offset_ptr + slice_index) + offs_n[None, :]
    current = tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, (current + delta).to(out_ptr.dtype.element_ty), mask=mask)


def lora_shrink_chunks(x, a_slices, chunks: torch.Tensor):
    """`lora_shrink` for the rows of `chunks` (rows outside them are left unwritten in y)."""
    num_tokens, k = x.shape
    rank = a_slices[0].shape[1]
    y = torch.empty((len(a_slices), num_tokens, rank), dtype=torch.float32, device=x.device)
    num_chunks = chunks.shape[0]
    if num_chunks:
        a0 = a_slices[0]
        _shrink_chunks_kernel[(num_chunks, len(a_slices))](
            x, _pointers(a_slices, x.device), chunks, y, k, rank, x.stride(0), a0.stride(0), a0.stride(1),
            y.stride(0), y.stride(1), BLOCK_T=CHUNK_ROWS, BLOCK_R=max(16, next_power_of_2(rank)),
            BLOCK_K=min(64, max(16, next_power_of_2(k))))
    return y


def lora_expand_chunks(y, b_slices, chunks: torch.Tensor, scales, out, offsets):
    num_slices, _, rank = y.shape
    num_chunks = chunks.shape[0]
    if num_chunks:
        widths = [b.shape[1] for b in b_slices]
        block_n = min(64, max(16, next_power_of_2(max(widths))))
        grid = (num_chunks, num_slices, triton.cdiv(max(widths), block_n))
        _expand_chunks_kernel[grid](
            y, _pointers(b_slices, y.device), _device_ints(tuple(widths), torch.int32, y.device),
            _device_ints(tuple(offsets), torch.int32, y.device), chunks, scales, out, rank, y.stride(0),
            y.stride(1), out.stride(0), BLOCK_T=CHUNK_ROWS, BLOCK_R=max(16, next_power_of_2(rank)),
            BLOCK_N=block_n)
    return out
