"""Fused MoE: routing, the align step and the grouped GEMM against the torch reference, at awkward shapes
(Triton in its CPU interpreter when there is no GPU)."""

import pytest
import torch
import torch.nn.functional as F

from asyncserve.kernels import (MOE_CONFIGS, fused_moe, fused_moe_ref, fused_moe_triton, max_padded_entries,
                                moe_align_block_size_ref, moe_align_block_size_triton, select_experts,
                                select_experts_triton)


def _moe_inputs(num_tokens, hidden, inter, num_experts, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    return [t.to(device, dtype) for t in (x, w13, w2, logits)]


def _dense_oracle(x, w13, w2, logits, top_k, renormalize):
    """Every token through its experts one by one, in float64: what the reference must compute."""
    probs = torch.softmax(logits.double(), dim=-1)
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        weights, experts = probs[t].topk(top_k)
        if renormalize:
            weights = weights / weights.sum()
        for weight, e in zip(weights, experts):
            gate_up = w13[e].double() @ x[t].double()
            out[t] += weight * (w2[e].double() @ (F.silu(gate_up[:inter]) * gate_up[inter:]))
    return out


def test_select_experts_takes_the_top_k_of_the_softmax():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0], [3.0, 0.0, 0.0, 3.5]])
    weights, ids = select_experts(logits, 2, renormalize=False)
    probs = torch.softmax(logits, dim=-1)
    assert ids.dtype == torch.int32
    assert ids.tolist() == [[1, 2], [3, 0]]
    torch.testing.assert_close(weights, probs.gather(1, ids.long()))
    renormalized, same_ids = select_experts(logits, 2, renormalize=True)
    assert same_ids.tolist() == ids.tolist()
    torch.testing.assert_close(renormalized, weights / weights.sum(-1, keepdim=True))
    torch.testing.assert_close(renormalized.sum(-1), torch.ones(2))


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 4, 1), (3, 5, 2), (7, 60, 8), (2, 128, 8), (0, 8, 2)])
def test_routing_kernel_matches_select_experts(num_tokens, num_experts, top_k, renormalize, triton_device):
    """One launch: softmax, top-k (largest first) and the rescale, as the torch reference."""
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_experts)) * 3
    weights, ids = select_experts_triton(logits.to(triton_device), top_k, renormalize)
    ref_weights, ref_ids = select_experts(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.cpu().tolist() == ref_ids.tolist()
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-6, atol=1e-7)


def test_routing_kernel_reads_strided_bfloat16_logits(triton_device):
    logits = torch.randn(3, 24, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    strided = torch.cat([logits, logits], dim=1)[:, :12]  # rows 24 apart
    weights, ids = select_experts_triton(strided.to(triton_device), 4, True)
    ref_weights, ref_ids = select_experts(strided, 4, True)
    assert ids.cpu().tolist() == ref_ids.tolist()
    torch.testing.assert_close(weights.cpu(), ref_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_reference_matches_a_dense_oracle(top_k, renormalize):
    x, w13, w2, logits = _moe_inputs(9, 24, 10, 5)
    torch.testing.assert_close(fused_moe_ref(x, w13, w2, logits, top_k, renormalize).double(),
                               _dense_oracle(x, w13, w2, logits, top_k, renormalize), rtol=1e-5, atol=1e-5)


def _check_alignment(sorted_ids, expert_ids, num_post, topk_ids, num_experts, block_m):
    """Every entry once, in a block of its own expert; each expert's run padded to whole blocks."""
    flat = topk_ids.flatten().tolist()
    num_entries = len(flat)
    sorted_ids, expert_ids, total = sorted_ids.tolist(), expert_ids.tolist(), int(num_post[0])
    assert len(sorted_ids) % block_m == 0 and len(expert_ids) == len(sorted_ids) // block_m
    assert len(sorted_ids) >= max_padded_entries(num_entries, num_experts, block_m)
    counts = [flat.count(e) for e in range(num_experts)]
    assert total == sum(-(-c // block_m) * block_m for c in counts)
    real = sorted_ids[:total]
    assert sorted(i for i in real if i != num_entries) == list(range(num_entries))
    assert all(i == num_entries for i in sorted_ids[total:])
    for block in range(total // block_m):
        entries = [i for i in real[block * block_m:(block + 1) * block_m] if i != num_entries]
        assert entries, "a real block holds no entry"
        assert {flat[i] for i in entries} == {expert_ids[block]}
    owners = expert_ids[:total // block_m]
    assert owners == sorted(owners)  # experts in order, each run contiguous
    return [sorted(real[b:b + block_m]) for b in range(0, total, block_m)], owners


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [
    (1, 1, 4, 16), (1, 8, 128, 16), (7, 2, 8, 16), (37, 3, 6, 32), (300, 2, 8, 64), (5, 4, 16, 128)])
def test_alignment_reference_and_triton(num_tokens, top_k, num_experts, block_m, triton_device):
    gen = torch.Generator().manual_seed(num_tokens)
    # Skewed routing: low experts often, some never.
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    ids = torch.where(torch.rand(ids.shape, generator=gen) < 0.5, ids // 2, ids)
    ids = torch.stack([row if len(set(row.tolist())) == top_k else torch.arange(top_k) for row in ids])
    ids = ids.to(torch.int32)
    ref = _check_alignment(*moe_align_block_size_ref(ids, num_experts, block_m), ids, num_experts, block_m)
    out = moe_align_block_size_triton(ids.to(triton_device), num_experts, block_m)
    assert _check_alignment(*[t.cpu() for t in out], ids, num_experts, block_m) == ref
    if ids.numel() <= 128:  # a decode batch's one-launch path keeps the reference's (stable) order
        expected = moe_align_block_size_ref(ids, num_experts, block_m)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(out, expected))


@pytest.mark.parametrize("num_tokens,hidden,inter,num_experts,top_k,renormalize", [
    (1, 40, 24, 5, 2, True),
    (3, 72, 40, 8, 2, True),
    (37, 40, 24, 6, 3, False),
    (20, 136, 20, 4, 1, False),
    (0, 40, 24, 5, 2, True),
])
def test_triton_matches_reference(num_tokens, hidden, inter, num_experts, top_k, renormalize, triton_device):
    x, w13, w2, logits = _moe_inputs(num_tokens, hidden, inter, num_experts, device=triton_device)
    out = fused_moe_triton(x, w13, w2, logits, top_k, renormalize)
    assert out.shape == (num_tokens, hidden)
    torch.testing.assert_close(out, fused_moe_ref(x, w13, w2, logits, top_k, renormalize), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config", MOE_CONFIGS)
def test_every_tile_config(config, triton_device):
    x, w13, w2, logits = _moe_inputs(19, 72, 40, 4, seed=1, device=triton_device)
    torch.testing.assert_close(fused_moe_triton(x, w13, w2, logits, 2, True, config),
                               fused_moe_ref(x, w13, w2, logits, 2, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("moe", [fused_moe_ref, fused_moe_triton])
def test_experts_no_token_chose_are_never_read(moe, triton_device):
    x, w13, w2, logits = _moe_inputs(6, 40, 24, 8, seed=2, device=triton_device)
    logits[:, 4:] -= 100.0  # experts 4..7 never win
    expected = fused_moe_ref(x, w13, w2, logits, 2, True)
    w13[4:], w2[4:] = float("nan"), float("nan")
    out = moe(x, w13, w2, logits, 2, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_dispatcher_takes_the_reference_on_the_cpu():
    x, w13, w2, logits = _moe_inputs(4, 16, 8, 4, seed=3)
    assert torch.equal(fused_moe(x, w13, w2, logits, 2, False), fused_moe_ref(x, w13, w2, logits, 2, False))
