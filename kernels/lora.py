"""Many LoRA adapters in one batch: each token's row goes through its own adapter's A and B (the BGMV shape:
gather by adapter slot, a small matmul per row), added onto the base projection's output.

    shrink:  x [T, K] -> y [S, T, r]       y[s, t] = x[t] @ A[s][slot[t]].T      (fp32)
    expand:  out[t, offset[s] : offset[s] + N[s]] += scale[slot[t]] * y[s, t] @ B[s][slot[t]].T

On the GPU the shrink is split over K: a decode step has a handful of rows, and one program walking a row's
whole K (4,096 to 14,336) one tile at a time is latency-bound (tens of microseconds per projection, half an
8B model's decode speed lost at batch 1). Each program takes `_SHRINK_K_PER_PROGRAM` columns and writes its
partial y [S, T, P, r]; the expand sums the P partials as it loads y, so the split costs no third launch and
the sum's order is fixed (no atomics).

`S` slices serve fused projections (Q, K, V of one QKV GEMM; gate and up of one gate/up GEMM), each slice with
its own A and B. Adapters live in fixed GPU slots (A [L, r, K] and B [L, N, r] per slice, the rank padded to the
largest adapter's), so a step's work is two launches per projection, whatever the mix of adapters, and the
shapes stay fixed for CUDA graphs. A slot of -1 is a row of the base model: untouched.
"""


import torch

from ._triton import next_power_of_2, tl, triton, use_triton


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def lora_shrink_ref(x, a_slices, slots):
    """x [T, K]; a_slices: S tensors [L, r, K]; slots [T] (-1: no adapter) -> y [S, T, r] fp32."""
    dtype = _compute_dtype(x)
    rows = slots.clamp(min=0).long()
    used = (slots >= 0).to(dtype)[:, None]
    return torch.stack([torch.einsum("tk,trk->tr", x.to(dtype), a[rows].to(dtype)) * used for a in a_slices])


def lora_expand_ref(y, b_slices, slots, scales, out, offsets):
    """y [S, T, r] fp32; b_slices: S tensors [L, N_s, r]; scales [L]; out [T, sum N_s] (added to in place);
    offsets: S ints, where each slice starts in out's columns."""
    dtype = _compute_dtype(y)
    y = shrink_total(y)
    rows = slots.clamp(min=0).long()
    used = (slots >= 0).to(dtype)[:, None]
    for s, b in enumerate(b_slices):
        delta = torch.einsum("tr,tnr->tn", y[s], b[rows].to(dtype)) * scales.to(dtype)[rows][:, None] * used
        out[:, offsets[s]:offsets[s] + b.shape[1]] += delta.to(out.dtype)
    return out


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, y_ptr, k, rank, stride_xt, stride_al, stride_ar,
                   stride_ys, stride_yt, stride_yp, K_PER_PROGRAM: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr):
    token = tl.program_id(0)
    slice_index = tl.program_id(1)
    part = tl.program_id(2)
    slot = tl.load(slots_ptr + token)
    offs_r = tl.arange(0, BLOCK_R)
    y_row = y_ptr + slice_index * stride_ys + token * stride_yt + part * stride_yp + offs_r
    if slot < 0:
        tl.store(y_row, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=offs_r < rank)
        return
    a_base = tl.load(a_ptr + slice_index).to(tl.pointer_type(x_ptr.dtype.element_ty))
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K_PER_PROGRAM, BLOCK_K):
        offs_k = part * K_PER_PROGRAM + k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + token * stride_xt + offs_k, mask=offs_k < k, other=0.0).to(tl.float32)
        a = tl.load(a_base + slot.to(tl.int64) * stride_al + offs_r[:, None] * stride_ar + offs_k[None, :],
                    mask=(offs_r[:, None] < rank) & (offs_k[None, :] < k), other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(y_row, acc, mask=offs_r < rank)


@triton.jit
def _expand_kernel(y_ptr, b_ptr, n_ptr, offset_ptr, slots_ptr, scales_ptr, out_ptr, rank, num_parts, stride_ys,
                   stride_yt, stride_yp, stride_ot, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    token = tl.program_id(0)
    slice_index = tl.program_id(1)
    block_n = tl.program_id(2)
    slot = tl.load(slots_ptr + token)
    n = tl.load(n_ptr + slice_index)
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if (slot < 0) | (block_n * BLOCK_N >= n):
        return
    b_base = tl.load(b_ptr + slice_index).to(tl.pointer_type(out_ptr.dtype.element_ty))
    offs_r = tl.arange(0, BLOCK_R)
    offs_p = tl.arange(0, BLOCK_P)  # the shrink's partial sums over K, added here in a fixed order
    y = tl.sum(tl.load(y_ptr + slice_index * stride_ys + token * stride_yt + offs_p[:, None] * stride_yp
                       + offs_r[None, :], mask=(offs_p[:, None] < num_parts) & (offs_r[None, :] < rank),
                       other=0.0), axis=0)
    b = tl.load(b_base + slot.to(tl.int64) * n * rank + offs_n[:, None] * rank + offs_r[None, :],  # contiguous [L, N_s, r]
                mask=(offs_n[:, None] < n) & (offs_r[None, :] < rank), other=0.0).to(tl.float32)
    delta = tl.sum(b * y[None, :], axis=1) * tl.load(scales_ptr + slot).to(tl.float32)
    out_cols = out_ptr + token * stride_ot + tl.load(offset_ptr + slice_index) + offs_n
    current = tl.load(out_cols, mask=offs_n < n, other=0.0).to(tl.float32)
    tl.store(out_cols, (current + delta).to(out_ptr.dtype.element_ty), mask=offs_n < n)


_TABLES: dict[tuple, torch.Tensor] = {}


def _device_ints(values: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Adapter stacks are allocated once and never move: their pointers, widths and offsets go to the device
    once. A copy per call would cost one per layer and step, and cannot run inside CUDA graph capture, so
    `prepare_lora_tables` fills this before any capture; unbounded, as a model has four tables per adapted
    layer and no more (a bounded cache evicted them on an 8B model and copied again during capture)."""
    key = (values, dtype, device)
    table = _TABLES.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a LoRA table was first asked for during CUDA graph capture: call "
                               "prepare_lora_tables(...) when the adapter stacks are allocated")
        table = _TABLES[key] = torch.tensor(values, dtype=dtype, device=device)
    return table


def _pointers(tensors, device):
    return _device_ints(tuple(t.data_ptr() for t in tensors), torch.int64, device)


def prepare_lora_tables(a_slices, b_slices, offsets) -> None:
    """The device tables the Triton kernels read for these stacks, made now (outside any graph capture)."""
    device = a_slices[0].device
    _pointers(a_slices, device)
    _pointers(b_slices, device)
    _device_ints(tuple(b.shape[1] for b in b_slices), torch.int32, device)
    _device_ints(tuple(offsets), torch.int32, device)


_SHRINK_K_PER_PROGRAM = 256


def shrink_partials(x, a_slices, max_block_k: int):
    """The split over K that both shrinks (per row here, per adapter in lora_grouped.py) launch with:
    (y [S, T, P, r] fp32 for the partial sums, BLOCK_K, columns per program)."""
    num_tokens, k = x.shape
    rank = a_slices[0].shape[1]
    assert all(a.shape[1:] == (rank, k) and a.stride() == a_slices[0].stride() and a.dtype == x.dtype
               for a in a_slices), "every slice's A must be [L, r, K] alike, in x's dtype"
    block_k = min(max_block_k, max(16, next_power_of_2(k)))
    k_per_program = max(block_k, _SHRINK_K_PER_PROGRAM)
    num_parts = triton.cdiv(k, k_per_program)
    y = torch.empty((len(a_slices), num_tokens, num_parts, rank), dtype=torch.float32, device=x.device)
    return y, block_k, k_per_program


def lora_shrink_triton(x, a_slices, slots):
    """y as partial sums over K: [S, T, P, r] fp32 (`lora_expand_triton` adds them up; `shrink_total` too)."""
    num_tokens, k = x.shape
    rank = a_slices[0].shape[1]
    y, block_k, k_per_program = shrink_partials(x, a_slices, max_block_k=128)
    num_parts = y.shape[2]
    if num_tokens:
        a0 = a_slices[0]
        _shrink_kernel[(num_tokens, len(a_slices), num_parts)](
            x, _pointers(a_slices, x.device), slots, y, k, rank, x.stride(0), a0.stride(0), a0.stride(1),
            y.stride(0), y.stride(1), y.stride(2), K_PER_PROGRAM=k_per_program,
            BLOCK_R=max(16, next_power_of_2(rank)), BLOCK_K=block_k)
    return y


def shrink_total(y):
    """y [S, T, r] from either shrink's result (the Triton one's partial sums added)."""
    return y.sum(dim=2) if y.dim() == 4 else y


def lora_expand_triton(y, b_slices, slots, scales, out, offsets):
    if y.dim() == 3:  # whole sums ([S, T, r]): one part each
        y = y.unsqueeze(2)
    num_slices, num_tokens, num_parts, rank = y.shape
    assert all(b.shape[2] == rank and b.is_contiguous() and b.dtype == out.dtype for b in b_slices), \
        "every slice's B must be a contiguous [L, N_s, r], in out's dtype"
    if num_tokens:
        widths = [b.shape[1] for b in b_slices]
        block_n = min(128, max(16, next_power_of_2(max(widths))))
        grid = (num_tokens, num_slices, triton.cdiv(max(widths), block_n))
        _expand_kernel[grid](
            y, _pointers(b_slices, y.device), _device_ints(tuple(widths), torch.int32, y.device),
            _device_ints(tuple(offsets), torch.int32, y.device), slots, scales, out, rank, num_parts,
            y.stride(0), y.stride(1), y.stride(2), out.stride(0),
            BLOCK_R=max(16, next_power_of_2(rank)), BLOCK_P=max(2, next_power_of_2(num_parts)), BLOCK_N=block_n)
    return out


def lora_shrink(x, a_slices, slots):
    return lora_shrink_triton(x, a_slices, slots) if use_triton(x) else lora_shrink_ref(x, a_slices, slots)


def lora_expand(y, b_slices, slots, scales, out, offsets):
    run = lora_expand_triton if use_triton(out) else lora_expand_ref
    return run(y, b_slices, slots, scales, out, offsets)
