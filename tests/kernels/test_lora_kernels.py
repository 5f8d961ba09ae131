"""The batched LoRA kernels (kernels/lora.py) against their torch references and against the plain formula,
on awkward sizes: rows of several adapters and of none in one batch, fused projections of unequal slices,
ranks and widths that are not powers of two. Triton runs in its CPU interpreter without a GPU."""
from __future__ import annotations

import pytest
import torch
from asyncserve.kernels.lora import (
    lora_expand_ref,
    lora_expand_triton,
    lora_shrink_ref,
    lora_shrink_triton,
    shrink_total,
)

SLOTS = [1, -1, 0, 2, 0, -1, 1]  # seven rows: three adapters and the base model, interleaved


def _case(device, dtype, k=40, rank=6, widths=(24, 8, 8), num_adapters=3, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x = randn(len(SLOTS), k)
    a_slices = [randn(num_adapters, rank, k) for _ in widths]
    b_slices = [randn(num_adapters, width, rank) for width in widths]
    scales = torch.tensor([0.5, 2.0, 1.25], device=device)
    slots = torch.tensor(SLOTS, dtype=torch.int32, device=device)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    base = randn(len(SLOTS), sum(widths))
    return x, a_slices, b_slices, scales, slots, offsets, base


def test_the_reference_is_the_lora_formula():
    x, a_slices, b_slices, scales, slots, offsets, base = _case("cpu", torch.float64)
    out = lora_expand_ref(lora_shrink_ref(x, a_slices, slots), b_slices, slots, scales, base.clone(), offsets)
    for row, slot in enumerate(SLOTS):
        expected = base[row].clone()
        if slot >= 0:
            for s, (a, b) in enumerate(zip(a_slices, b_slices)):
                expected[offsets[s]:offsets[s] + b.shape[1]] += scales[slot] * (b[slot] @ (a[slot] @ x[row]))
        torch.testing.assert_close(out[row], expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [40, 600], ids=["one-part", "split-k"])  # 600: three parts, the last one short
def test_triton_kernels_match_the_reference(triton_device, dtype, k):
    x, a_slices, b_slices, scales, slots, offsets, base = _case(triton_device, dtype, k=k)
    y = lora_shrink_triton(x, a_slices, slots)
    assert y.shape[2] == (1 if k == 40 else 3)
    expected_y = lora_shrink_ref(x, a_slices, slots)
    torch.testing.assert_close(shrink_total(y), expected_y, atol=1e-4 if dtype == torch.float32 else 5e-2,
                               rtol=1e-3)
    tolerance = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-1, rtol=2e-2)
    expected = lora_expand_ref(expected_y, b_slices, slots, scales, base.clone(), offsets)
    for given in (expected_y, y):  # whole sums, or the shrink's partial sums added as the expand loads them
        out = lora_expand_triton(given, b_slices, slots, scales, base.clone(), offsets)
        torch.testing.assert_close(out, expected, **(tolerance if given is expected_y else
                                                     dict(atol=5e-4, rtol=1e-3) if dtype == torch.float32
                                                     else dict(atol=2e-1, rtol=3e-2)))
    base_rows = [row for row, slot in enumerate(SLOTS) if slot < 0]
    assert torch.equal(out[base_rows], base[base_rows])  # the base model's rows are untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rank", [8, 64])
def test_real_shapes_on_the_gpu(rank):
    """Llama-3.1-8B's fused QKV (4096 -> 4096 | 1024 | 1024) in bf16, four adapter slots, 37 rows."""
    global SLOTS
    saved, SLOTS = SLOTS, [(3 * i) % 5 - 1 for i in range(37)]
    try:
        x, a_slices, b_slices, scales, slots, offsets, base = _case("cuda", torch.bfloat16, k=4096, rank=rank,
                                                                     widths=(4096, 1024, 1024), num_adapters=4)
        scales = torch.tensor([0.5, 2.0, 1.25, 1.0], device="cuda")
        y = lora_shrink_triton(x, a_slices, slots)
        torch.testing.assert_close(shrink_total(y), lora_shrink_ref(x, a_slices, slots), atol=0.5, rtol=2e-2)
        out = lora_expand_triton(y, b_slices, slots, scales, base.clone(), offsets)
        expected = lora_expand_ref(y, b_slices, slots, scales, base.clone(), offsets)
        torch.testing.assert_close(out, expected, atol=1.0, rtol=2e-2)
    finally:
        SLOTS = saved


def test_chunk_kernels_match_the_reference_over_prompt_segments(triton_device):
    """Prompt rows in segments of one adapter each (one longer than a chunk), base rows between them."""
    from asyncserve.kernels.lora_segments import CHUNK_ROWS, lora_chunks, lora_expand_chunks, lora_shrink_chunks
    segments = [(0, 3, 1), (3, 5, -1), (8, CHUNK_ROWS + 7, 0), (CHUNK_ROWS + 15, 2, 2)]  # (first, rows, slot)
    row_slots = [slot for _, count, slot in segments for _ in range(count)]
    global SLOTS
    saved, SLOTS = SLOTS, row_slots
    try:
        x, a_slices, b_slices, scales, slots, offsets, base = _case(triton_device, torch.float32)
    finally:
        SLOTS = saved
    table = lora_chunks([segment for segment in segments if segment[2] >= 0])
    assert len(table) == 3 * 4  # the long segment takes two chunks
    chunks = torch.tensor(table, dtype=torch.int64, device=triton_device).view(-1, 3)
    y = lora_shrink_chunks(x, a_slices, chunks)
    expected_y = lora_shrink_ref(x, a_slices, slots)
    used = slots >= 0
    torch.testing.assert_close(y[:, used], expected_y[:, used], atol=1e-4, rtol=1e-4)
    out = lora_expand_chunks(expected_y, b_slices, chunks, scales, base.clone(), offsets)
    expected = lora_expand_ref(expected_y, b_slices, slots, scales, base.clone(), offsets)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[~used], base[~used])


def test_slice_tables_are_made_once_and_kept_for_every_layer():
    """The kernels' pointer/width/offset tables are made when a layer's stacks are allocated and found again
    on every call: an 8B model has hundreds of them, and a table made anew inside CUDA graph capture fails
    (a bounded cache of 256 evicted them there)."""
    from asyncserve.kernels.lora import _device_ints, _pointers, prepare_lora_tables
    layers = [([torch.zeros(2, 4, 8)], [torch.zeros(2, 6, 4)], [0]) for _ in range(300)]
    for a, b, offsets in layers:
        prepare_lora_tables(a, b, offsets)
    first = [(_pointers(a, a[0].device), _pointers(b, b[0].device)) for a, b, _ in layers]
    again = [(_pointers(a, a[0].device), _pointers(b, b[0].device)) for a, b, _ in layers]
    assert all(x[0] is y[0] and x[1] is y[1] for x, y in zip(first, again))
    assert _device_ints((6,), torch.int32, torch.device("cpu")).tolist() == [6]
