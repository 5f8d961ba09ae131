"""A mixture-of-experts layer for one token (batch-1 decode) in two kernels instead of six.

The grouped path (moe.py) routes, aligns, runs two grouped GEMMs, the activation and a sum over the top-k
slots: six launches per layer, each a few microseconds of fixed cost, while one token's layer reads only its
top-k experts' weights (for Qwen3-30B-A3B, 48 layers: the launches cost about as much as the reads). Here:

    gate_up kernel, grid (top_k, I / BLOCK_I): each program takes the token's top-k from its router logits
      (`moe.top_k_experts`, recomputed per program: E values in registers), then one slot's expert's gate
      and up rows over the hidden state (GEMV), bias, gated activation -> act [top_k, I]; the first program
      of each slot also stores the slot's (weight, expert)
    down kernel, grid (H / BLOCK_H): each program walks every slot's expert's down rows over act, adds the
      bias, and sums the slots times their routing weights in float32 -> out [1, H]

Roundings as `fused_moe_ref`'s: each product and bias addition rounded to the hidden dtype, the activation
computed in float32 and rounded, the weighted sum over slots in float32 then rounded. Float experts only
(`QuantExperts` take the grouped path).
"""

import torch

from ._triton import next_power_of_2, tl, triton
from .activation import gated_activation
from .moe import _MAX_ROUTED_EXPERTS, _check_activation, top_k_experts

# ((BLOCK_I, BLOCK_K, warps) of the gate_up kernel, (BLOCK_H, BLOCK_K, warps) of the down kernel); the layer
# times them at start-up against the grouped path (layers/moe.py).
# The down kernel wants many narrow programs (one per BLOCK_H outputs walks all slots): on an H100 at Qwen3-30B-A3B's
# shape (a layer, graph-timed) 2 outputs per program took 37.8 µs, 4 39.6, 8 44.3 and 16 55.3 (the grouped path
# 43.9-45.6). The fastest three are timed at start-up (five Triton compiles: two gate_up tiles, three down tiles).
MOE_ROW_CONFIGS = (((16, 256, 4), (2, 1024, 4)), ((16, 256, 4), (4, 512, 4)), ((8, 512, 4), (8, 512, 4)))


@triton.jit
def _moe_row_gate_up_kernel(hidden_ptr, logits_ptr, w13_ptr, bias_ptr, act_ptr, weights_ptr, ids_ptr,
                            num_experts, H, I, stride_we, stride_wn, stride_bias_e, alpha, limit,
                            TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                            RENORMALIZE: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
                            BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    slot = tl.program_id(0)
    top_weights, top_ids = top_k_experts(logits_ptr, num_experts, TOP_K, K_POW2, E_POW2, RENORMALIZE)
    slots = tl.arange(0, K_POW2)
    expert = tl.sum(tl.where(slots == slot, top_ids, 0), axis=0).to(tl.int64)
    if tl.program_id(1) == 0:
        tl.store(weights_ptr + slot, tl.sum(tl.where(slots == slot, top_weights, 0.0), axis=0))
        tl.store(ids_ptr + slot, expert.to(tl.int32))
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_mask = offs_i < I
    gate_rows = w13_ptr + expert * stride_we + offs_i.to(tl.int64)[:, None] * stride_wn
    up_rows = gate_rows + I * stride_wn
    gate_acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    up_acc = tl.zeros((BLOCK_I, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < H
        x = tl.load(hidden_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        mask = i_mask[:, None] & col_mask[None, :]
        gate_acc += tl.load(gate_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x
        up_acc += tl.load(up_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x
    dtype = act_ptr.dtype.element_ty
    gate = tl.sum(gate_acc, axis=1).to(dtype)
    up = tl.sum(up_acc, axis=1).to(dtype)
    if HAS_BIAS:
        bias_row = bias_ptr + expert * stride_bias_e
        gate = gate + tl.load(bias_row + offs_i, mask=i_mask, other=0.0)
        up = up + tl.load(bias_row + I + offs_i, mask=i_mask, other=0.0)
    act = gated_activation(gate.to(tl.float32), up.to(tl.float32), alpha, limit, ACTIVATION)
    tl.store(act_ptr + slot * I + offs_i, act.to(dtype), mask=i_mask)


@triton.jit
def _moe_row_down_kernel(act_ptr, w2_ptr, bias_ptr, weights_ptr, ids_ptr, out_ptr, H, I, stride_we, stride_wn,
                         stride_bias_e, TOP_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for slot in range(TOP_K):
        expert = tl.load(ids_ptr + slot).to(tl.int64)
        rows = w2_ptr + expert * stride_we + offs_h.to(tl.int64)[:, None] * stride_wn
        acc = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < I
            a = tl.load(act_ptr + slot * I + cols, mask=col_mask, other=0.0).to(tl.float32)
            w = tl.load(rows + cols[None, :], mask=h_mask[:, None] & col_mask[None, :], other=0.0)
            acc += w.to(tl.float32) * a[None, :]
        y = tl.sum(acc, axis=1).to(dtype)
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + expert * stride_bias_e + offs_h, mask=h_mask, other=0.0)
        total += y.to(tl.float32) * tl.load(weights_ptr + slot)
    tl.store(out_ptr + offs_h, total.to(dtype), mask=h_mask)


def fused_moe_row_applies(hidden, w13) -> bool:
    """One token, float experts stacked as tensors, few enough experts to route in registers."""
    return (hidden.shape[0] == 1 and isinstance(w13, torch.Tensor) and w13.shape[0] <= _MAX_ROUTED_EXPERTS)


def fused_moe_row_triton(hidden, w13, w2, router_logits, top_k, renormalize, config=None, *, w13_bias=None,
                         w2_bias=None, activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0):
    """`fused_moe_ref` for one token in two kernels; `config` one of MOE_ROW_CONFIGS (default the first)."""
    _check_activation(activation)
    if not fused_moe_row_applies(hidden, w13):
        raise ValueError(f"the one-row MoE takes one token and at most {_MAX_ROUTED_EXPERTS} float experts, got "
                         f"{hidden.shape[0]} tokens and {type(w13).__name__} experts")
    (block_i, block_k13, warps13), (block_h, block_k2, warps2) = config or MOE_ROW_CONFIGS[0]
    num_experts, two_inter, hidden_size = w13.shape
    intermediate = two_inter // 2
    assert hidden.stride(1) == 1 and w13.stride(2) == 1 and w2.stride(2) == 1 and router_logits.stride(1) == 1
    device = hidden.device
    act = torch.empty(top_k, intermediate, dtype=hidden.dtype, device=device)
    weights = torch.empty(top_k, dtype=torch.float32, device=device)
    ids = torch.empty(top_k, dtype=torch.int32, device=device)
    out = torch.empty_like(hidden)
    has_bias = w13_bias is not None
    _moe_row_gate_up_kernel[(top_k, triton.cdiv(intermediate, block_i))](
        hidden, router_logits, w13, w13_bias if has_bias else w13, act, weights, ids, num_experts, hidden_size,
        intermediate, w13.stride(0), w13.stride(1), w13_bias.stride(0) if has_bias else 0, float(swiglu_alpha),
        float(swiglu_limit), TOP_K=top_k, K_POW2=next_power_of_2(top_k), E_POW2=next_power_of_2(num_experts),
        RENORMALIZE=bool(renormalize), HAS_BIAS=has_bias, ACTIVATION=activation, BLOCK_I=block_i,
        BLOCK_K=block_k13, num_warps=warps13)
    _moe_row_down_kernel[(triton.cdiv(hidden_size, block_h),)](
        act, w2, w2_bias if w2_bias is not None else w2, weights, ids, out, hidden_size, intermediate, w2.stride(0),
        w2.stride(1), w2_bias.stride(0) if w2_bias is not None else 0, TOP_K=top_k, HAS_BIAS=w2_bias is not None,
        BLOCK_H=block_h, BLOCK_K=block_k2, num_warps=warps2)
    return out
