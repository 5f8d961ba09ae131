"""LoRA rows grouped by adapter (kernels/lora_grouped.py) against the per-row reference: rows of several
adapters and of none interleaved, a group longer than one tile of rows, an adapter slot with no rows, split-K
widths, ranks and slice widths that are not powers of two. Triton runs in its CPU interpreter without a GPU,
in fp32 and fp16: the interpreter's tensor-core dot of two bf16 tiles returns garbage (numpy has no bfloat16),
so bf16 is checked on the GPU, at the 8B shapes."""
from __future__ import annotations

import pytest
import torch

from asyncserve.kernels.lora import lora_expand_ref, lora_shrink_ref
from asyncserve.kernels.lora_grouped import (BLOCK_ROWS, lora_expand_grouped, lora_shrink_grouped,
                                             lora_slot_groups)

NUM_SLOTS = 4  # slot 3 has no rows
# 2 + BLOCK_ROWS + 3 rows of slot 0 (two tiles), 3 of slot 1, 2 of slot 2, base rows between, padding at the end.
SLOTS = ([0, -1, 1, 0, 2] + [0] * BLOCK_ROWS + [1, -1, 2, 1] + [0] * 3 + [-1, -1])


def _groups(slots: torch.Tensor):
    order = torch.zeros(len(slots), dtype=torch.int32, device=slots.device)
    starts = torch.zeros(NUM_SLOTS, dtype=torch.int32, device=slots.device)
    counts = torch.zeros(NUM_SLOTS, dtype=torch.int32, device=slots.device)
    lora_slot_groups(slots, NUM_SLOTS, order, starts, counts)
    return order, starts, counts


def test_groups_list_each_slots_rows_in_order():
    slots = torch.tensor(SLOTS, dtype=torch.int32)
    order, starts, counts = _groups(slots)
    for slot in range(NUM_SLOTS):
        rows = order[starts[slot]:starts[slot] + counts[slot]].tolist()
        assert rows == [row for row, s in enumerate(SLOTS) if s == slot]
    assert counts.tolist() == [SLOTS.count(slot) for slot in range(NUM_SLOTS)]
    assert starts[0] == SLOTS.count(-1)  # the base model's rows sort first and belong to no group


def _case(device, dtype, k, rank, widths, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    x = randn(len(SLOTS), k)
    a_slices = [randn(NUM_SLOTS, rank, k) for _ in widths]
    b_slices = [randn(NUM_SLOTS, width, rank) for width in widths]
    scales = torch.tensor([0.5, 2.0, 1.25, 3.0], device=device)
    slots = torch.tensor(SLOTS, dtype=torch.int32, device=device)
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    base = randn(len(SLOTS), sum(widths))
    return x, a_slices, b_slices, scales, slots, offsets, base


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("k", "rank", "widths"), [(40, 6, (24, 8, 8)), (600, 16, (70,)), (300, 3, (17, 90)),
                                              (2500, 5, (20,))],
                         ids=["qkv-one-part", "split-k", "two-slices-odd", "ten-parts"])  # 10: two loads of 8
def test_grouped_kernels_match_the_per_row_reference(triton_device, dtype, k, rank, widths):
    x, a_slices, b_slices, scales, slots, offsets, base = _case(triton_device, dtype, k, rank, widths)
    groups = _groups(slots)
    used = slots >= 0
    y = lora_shrink_grouped(x, a_slices, *groups)
    expected_y = lora_shrink_ref(x, a_slices, slots)
    loose = dtype != torch.float32
    torch.testing.assert_close(y.sum(dim=2)[:, used], expected_y[:, used],
                               atol=5e-2 if loose else 1e-4, rtol=1e-2 if loose else 1e-4)
    out = lora_expand_grouped(y, b_slices, *groups, scales, base.clone(), offsets)
    expected = lora_expand_ref(expected_y, b_slices, slots, scales, base.clone(), offsets)
    torch.testing.assert_close(out, expected, atol=2e-1 if loose else 5e-4, rtol=3e-2 if loose else 1e-3)
    assert torch.equal(out[~used], base[~used])  # the base model's rows: neither read nor written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("k", "widths"), [(4096, (4096, 1024, 1024)), (4096, (14336, 14336)), (14336, (4096,))],
                         ids=["qkv", "gate-up", "down"])
def test_real_shapes_on_the_gpu(k, widths):
    """Llama-3.1-8B's projections in bf16, rank 16: the grouped kernels next to the per-row ones."""
    from asyncserve.kernels.lora import lora_expand_triton, lora_shrink_triton
    x, a_slices, b_slices, scales, slots, offsets, base = _case("cuda", torch.bfloat16, k, 16, widths)
    groups = _groups(slots)
    y = lora_shrink_grouped(x, a_slices, *groups)
    per_row = lora_shrink_triton(x, a_slices, slots)
    used = slots >= 0
    torch.testing.assert_close(y.sum(dim=2)[:, used], per_row.sum(dim=2)[:, used], atol=0.5, rtol=2e-2)
    out = lora_expand_grouped(y, b_slices, *groups, scales, base.clone(), offsets)
    expected = lora_expand_triton(per_row, b_slices, slots, scales, base.clone(), offsets)
    torch.testing.assert_close(out, expected, atol=1.0, rtol=2e-2)
    assert torch.equal(out[~used], base[~used])


def test_no_rows_with_adapters_leave_the_output_alone(triton_device):
    x, a_slices, b_slices, scales, slots, offsets, base = _case(triton_device, torch.float32, 40, 6, (24,))
    slots = torch.full_like(slots, -1)
    groups = _groups(slots)
    assert groups[2].sum() == 0
    out = lora_expand_grouped(lora_shrink_grouped(x, a_slices, *groups), b_slices, *groups, scales, base.clone(),
                              offsets)
    assert torch.equal(out, base)


def test_the_slots_table_keeps_its_groups_current():
    """LoRASlots refills the groups with each step's slot table and empties them for a base-only step, so
    a replayed graph never applies an earlier step's adapters (the switch on, on a CPU device for the test)."""
    from asyncserve.layers import lora as lora_layer
    slots = lora_layer.LoRASlots(max_loras=NUM_SLOTS, max_lora_rank=8, max_tokens=len(SLOTS), device="cpu")
    slots.groups = (torch.zeros(len(SLOTS), dtype=torch.int32), torch.zeros(NUM_SLOTS, dtype=torch.int32),
                    torch.zeros(NUM_SLOTS, dtype=torch.int32))
    slots.set_token_slots(torch.tensor(SLOTS[:10], dtype=torch.int32))
    assert slots.groups[2].tolist() == [SLOTS[:10].count(slot) for slot in range(NUM_SLOTS)]
    slots.clear_token_slots()
    assert slots.groups[2].tolist() == [0] * NUM_SLOTS and bool((slots.token_slots == -1).all())
