"""Fused mixture-of-experts MLP: router top-k, then a grouped GEMM over tokens sorted by expert.

    hidden [M, H] --top-k of softmax(router_logits)--> M * top_k (token, expert, weight) entries
    align: entries grouped per expert, each group padded to BLOCK_M rows -> sorted_token_ids
    w13 [E, 2I, H]: [M * top_k, 2I] (+ w13_bias [E, 2I]) -> silu(gate) * up -> [M * top_k, I]
    w2  [E, H, I]:  [M * top_k, H] (+ w2_bias [E, H]) times each entry's routing weight -> summed per token [M, H]

Options (keywords, off by default): per-expert biases `w13_bias` / `w2_bias` (added inside the GEMMs'
epilogue, before the routing weight), and `activation` "swigluoai" with `swiglu_alpha` / `swiglu_limit`
for GPT-OSS's clamped SwiGLU instead of "silu".

Each BLOCK_M block of sorted entries belongs to one expert, so a program multiplies its rows by that
expert's weights only: at decode the GEMM reads just the experts the batch routed to. Every buffer has
a size fixed by M, top_k and E (padding bounded by min(M * top_k, E) * (BLOCK_M - 1)), and the device
says where the real blocks end: no host sync, so CUDA graphs capture decode steps.
"""

import functools

import torch
import torch.nn.functional as F

from ._triton import next_power_of_2, tl, triton, use_triton
from .activation import (
    silu_and_mul_ref,
    silu_and_mul_triton,
    swiglu_oai_and_mul_ref,
    swiglu_oai_and_mul_triton,
)
from .moe_quant import QuantExperts, moe_quant_gemm, quant_moe_tiles
from .moe_tiles import MoeTiles, cdiv, max_padded_entries, moe_config, table_tiles
from .moe_tuned import cuda_device_name, tuned_tiles

MOE_ACTIVATIONS = ("silu", "swigluoai")

_ALIGN_BLOCK = 1024


def select_experts(router_logits, top_k, renormalize):
    """router_logits [M, E] -> (weights float32 [M, top_k], expert ids int32 [M, top_k]): the top-k
    of the softmax, taken in float32; `renormalize` rescales each token's k weights to sum to 1."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


@triton.jit
def top_k_experts(row_logits_ptr, num_experts, TOP_K: tl.constexpr, K_POW2: tl.constexpr, E_POW2: tl.constexpr,
                  RENORMALIZE: tl.constexpr):
    """One token's (weights float32 [K_POW2], expert ids int32 [K_POW2]), the first TOP_K valid: the softmax of
    its router logits in float32, then its top-k, largest first (the lower expert on a tie), rescaled to sum
    to 1 if RENORMALIZE."""
    experts = tl.arange(0, E_POW2)
    valid = experts < num_experts
    logits = tl.load(row_logits_ptr + experts, mask=valid, other=float("-inf")).to(tl.float32)
    exps = tl.where(valid, tl.exp(logits - tl.max(logits, axis=0)), 0.0)
    remaining = tl.where(valid, exps / tl.sum(exps, axis=0), -1.0)  # probabilities are >= 0: -1 is taken
    slots = tl.arange(0, K_POW2)
    top_weights = tl.zeros((K_POW2,), dtype=tl.float32)
    top_ids = tl.zeros((K_POW2,), dtype=tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(remaining, axis=0)
        chosen = tl.min(tl.where(remaining == best, experts, E_POW2), axis=0)
        top_weights = tl.where(slots == slot, best, top_weights)
        top_ids = tl.where(slots == slot, chosen, top_ids)
        remaining = tl.where(experts == chosen, -1.0, remaining)
    if RENORMALIZE:
        top_weights = top_weights / tl.sum(top_weights, axis=0)
    return top_weights, top_ids


@triton.jit
def _route_kernel(logits_ptr, weights_ptr, ids_ptr, num_experts, stride_lm, TOP_K: tl.constexpr,
                  K_POW2: tl.constexpr, E_POW2: tl.constexpr, RENORMALIZE: tl.constexpr):
    """One token per program: `select_experts` in one launch."""
    row = tl.program_id(0).to(tl.int64)
    top_weights, top_ids = top_k_experts(logits_ptr + row * stride_lm, num_experts, TOP_K, K_POW2, E_POW2,
                                         RENORMALIZE)
    slots = tl.arange(0, K_POW2)
    tl.store(weights_ptr + row * TOP_K + slots, top_weights, mask=slots < TOP_K)
    tl.store(ids_ptr + row * TOP_K + slots, top_ids, mask=slots < TOP_K)


_MAX_ROUTED_EXPERTS = 1024  # one token's logits in one program's registers


def select_experts_triton(router_logits, top_k, renormalize):
    """Triton version of `select_experts`: one launch instead of softmax, top-k, rescale and cast."""
    num_tokens, num_experts = router_logits.shape
    assert router_logits.stride(1) == 1
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        _route_kernel[(num_tokens,)](router_logits, weights, ids, num_experts, router_logits.stride(0),
                                     TOP_K=top_k, K_POW2=next_power_of_2(top_k),
                                     E_POW2=next_power_of_2(num_experts), RENORMALIZE=bool(renormalize))
    return weights, ids


def _check_activation(activation):
    if activation not in MOE_ACTIVATIONS:
        raise ValueError(f"MoE activation {activation!r} is not supported (one of {', '.join(MOE_ACTIVATIONS)} is)")


def _activate_ref(gate_up, activation, swiglu_alpha, swiglu_limit):
    if activation == "swigluoai":
        return swiglu_oai_and_mul_ref(gate_up, swiglu_alpha, swiglu_limit)
    return silu_and_mul_ref(gate_up)


def _expert_weight(weights, expert, dtype):
    """One expert's [N, K] matrix: a slice of a float stack, or dequantized from `QuantExperts`."""
    return weights.dequantize(expert, dtype) if isinstance(weights, QuantExperts) else weights[expert]


def fused_moe_ref(hidden, w13, w2, router_logits, top_k, renormalize, *, w13_bias=None, w2_bias=None,
                  activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0):
    """hidden [M, H], w13 [E, 2I, H] (gate rows, then up rows), w2 [E, H, I], router_logits [M, E]
    -> [M, H] = sum over each token's top-k experts of weight * (w2 @ act(gate, up) + w2_bias).
    One pass per used expert over the tokens routed to it, as transformers does (biases added after
    each product, as its experts do). w13 / w2 may be `QuantExperts`: each routed expert's weights are
    dequantized (in float32, then to hidden's dtype) for its pass."""
    _check_activation(activation)
    weights, ids = select_experts(router_logits, top_k, renormalize)
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    for expert in range(w13.shape[0]):
        rows, slots = torch.where(ids == expert)
        if rows.numel() == 0:
            continue
        gate_up = F.linear(hidden[rows], _expert_weight(w13, expert, hidden.dtype))  # [t, 2I]
        if w13_bias is not None:
            gate_up = gate_up + w13_bias[expert]
        x = _activate_ref(gate_up, activation, swiglu_alpha, swiglu_limit)  # [t, I]
        y = F.linear(x, _expert_weight(w2, expert, hidden.dtype))           # [t, H]
        if w2_bias is not None:
            y = y + w2_bias[expert]
        out.index_add_(0, rows, y.float() * weights[rows, slots, None])
    return out.to(hidden.dtype)


def moe_align_block_size_ref(topk_ids, num_experts, block_m):
    """topk_ids [M, top_k] -> (sorted_token_ids int32 [P], expert_ids int32 [P // block_m],
    num_tokens_post_padded int32 [1]), P = max_padded_entries rounded up to block_m.

    sorted_token_ids lists the flat entry indices (token * top_k + slot) expert by expert, each expert's
    run padded with M * top_k to a multiple of block_m; expert_ids[b] is the expert of block b; blocks
    from num_tokens_post_padded on are unused. Stable sort: entries keep their order within an expert."""
    flat = topk_ids.flatten().long()
    num_entries = flat.numel()
    num_blocks = cdiv(max_padded_entries(num_entries, num_experts, block_m), block_m)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    sorted_experts, order = torch.sort(flat, stable=True)
    first = counts.cumsum(0) - counts
    rank = torch.arange(num_entries, device=flat.device) - first[sorted_experts]
    sorted_ids = torch.full((num_blocks * block_m,), num_entries, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[sorted_experts] + rank] = order.to(torch.int32)
    blocks = torch.arange(num_blocks, device=flat.device)
    expert_ids = torch.searchsorted(ends // block_m, blocks, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, expert_ids.to(torch.int32), ends[-1:].to(torch.int32)


@triton.jit
def _count_kernel(topk_ids_ptr, counts_ptr, ranks_ptr, num_entries, BLOCK: tl.constexpr):
    """Per-expert counts; each entry's rank within its expert is the count its atomic add saw."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_entries
    expert = tl.load(topk_ids_ptr + offs, mask=mask, other=0)
    rank = tl.atomic_add(counts_ptr + expert, 1, mask=mask)
    tl.store(ranks_ptr + offs, rank, mask=mask)


@triton.jit
def _store_block_experts_and_padding(block_ends, expert_ids_ptr, sorted_ids_ptr, num_experts, num_entries,
                                     num_blocks, BLOCK_M: tl.constexpr, BLOCK: tl.constexpr,
                                     FILL_BLOCK: tl.constexpr):
    """Every block's expert (the first whose padded run ends past it), and padding in every slot."""
    for first in range(0, num_blocks, BLOCK):
        blocks = first + tl.arange(0, BLOCK)
        owner = tl.sum((block_ends[None, :] <= blocks[:, None]).to(tl.int32), axis=1)
        tl.store(expert_ids_ptr + blocks, tl.minimum(owner, num_experts - 1), mask=blocks < num_blocks)
    for first in range(0, num_blocks * BLOCK_M, FILL_BLOCK):
        slots = first + tl.arange(0, FILL_BLOCK)
        tl.store(sorted_ids_ptr + slots, tl.zeros((FILL_BLOCK,), tl.int32) + num_entries,
                 mask=slots < num_blocks * BLOCK_M)


@triton.jit
def _offsets_kernel(counts_ptr, starts_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, num_experts,
                    num_entries, num_blocks, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr,
                    BLOCK: tl.constexpr, FILL_BLOCK: tl.constexpr):
    """One program: padded runs' starts, the total, every block's expert, padding everywhere."""
    experts = tl.arange(0, E_POW2)
    valid = experts < num_experts
    counts = tl.load(counts_ptr + experts, mask=valid, other=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(starts_ptr + experts, ends - padded, mask=valid)
    tl.store(num_post_ptr, tl.sum(padded, 0))
    block_ends = tl.where(valid, ends // BLOCK_M, 1 << 30)
    _store_block_experts_and_padding(block_ends, expert_ids_ptr, sorted_ids_ptr, num_experts, num_entries,
                                     num_blocks, BLOCK_M, BLOCK, FILL_BLOCK)


@triton.jit
def _scatter_kernel(topk_ids_ptr, ranks_ptr, starts_ptr, sorted_ids_ptr, num_entries, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_entries
    expert = tl.load(topk_ids_ptr + offs, mask=mask, other=0)
    slot = tl.load(starts_ptr + expert, mask=mask, other=0) + tl.load(ranks_ptr + offs, mask=mask, other=0)
    tl.store(sorted_ids_ptr + slot, offs, mask=mask)


@triton.jit
def _align_small_kernel(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr, num_experts, num_entries,
                        num_blocks, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr, N_POW2: tl.constexpr,
                        BLOCK: tl.constexpr, FILL_BLOCK: tl.constexpr):
    """The whole align step of a few entries (a decode batch) in one program: counts from a one-hot
    [experts, entries] matrix, each entry's rank among the earlier entries of its expert from an
    [entries, entries] one (stable, as the reference), the padded runs' starts, every block's expert."""
    offs = tl.arange(0, N_POW2)
    valid = offs < num_entries
    ids = tl.load(topk_ids_ptr + offs, mask=valid, other=-1)
    experts = tl.arange(0, E_POW2)
    onehot = ids[None, :] == experts[:, None]                                    # [E, N]
    counts = tl.sum(onehot.to(tl.int32), axis=1)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(num_post_ptr, tl.sum(padded, 0))
    start = tl.sum(tl.where(onehot, (ends - padded)[:, None], 0), axis=0)      # [N]: its expert's run
    earlier = (ids[:, None] == ids[None, :]) & (offs[None, :] < offs[:, None])  # [N, N]
    slot = start + tl.sum(earlier.to(tl.int32), axis=1)
    block_ends = tl.where(experts < num_experts, ends // BLOCK_M, 1 << 30)
    _store_block_experts_and_padding(block_ends, expert_ids_ptr, sorted_ids_ptr, num_experts, num_entries,
                                     num_blocks, BLOCK_M, BLOCK, FILL_BLOCK)
    tl.debug_barrier()  # the padding is written before the entries land on it
    tl.store(sorted_ids_ptr + slot, offs, mask=valid)


_SMALL_ALIGN_ENTRIES = 128   # one program holds an [entries, entries] comparison: decode batches
_SMALL_ALIGN_EXPERTS = 256


def moe_align_block_size_triton(topk_ids, num_experts, block_m):
    """Triton version of `moe_align_block_size_ref` and no host sync: one launch for a decode batch's
    few entries (stable, as the reference), three above, where the order within an expert follows the
    atomics (any order gives the same products)."""
    flat = topk_ids.reshape(-1)
    num_entries = flat.numel()
    num_blocks = cdiv(max_padded_entries(num_entries, num_experts, block_m), block_m)
    device = flat.device
    e_pow2 = next_power_of_2(num_experts)
    if num_entries <= _SMALL_ALIGN_ENTRIES and num_experts <= _SMALL_ALIGN_EXPERTS:
        sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
        expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
        num_post = torch.empty(1, dtype=torch.int32, device=device)
        _align_small_kernel[(1,)](flat, sorted_ids, expert_ids, num_post, num_experts, num_entries, num_blocks,
                                  BLOCK_M=block_m, E_POW2=e_pow2, N_POW2=max(16, next_power_of_2(num_entries)),
                                  BLOCK=max(16, min(_ALIGN_BLOCK, 16384 // e_pow2)), FILL_BLOCK=_ALIGN_BLOCK)
        return sorted_ids, expert_ids, num_post
    counts = torch.zeros(num_experts, dtype=torch.int32, device=device)
    scratch = torch.empty(num_entries + num_experts + 1, dtype=torch.int32, device=device)
    ranks, starts, num_post = scratch[:num_entries], scratch[num_entries:-1], scratch[-1:]
    sorted_ids = torch.empty(num_blocks * block_m, dtype=torch.int32, device=device)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    grid = (triton.cdiv(num_entries, _ALIGN_BLOCK),)
    _count_kernel[grid](flat, counts, ranks, num_entries, BLOCK=_ALIGN_BLOCK)
    _offsets_kernel[(1,)](counts, starts, sorted_ids, expert_ids, num_post, num_experts, num_entries,
                          num_blocks, BLOCK_M=block_m, E_POW2=next_power_of_2(num_experts),
                          BLOCK=max(16, min(_ALIGN_BLOCK, 16384 // next_power_of_2(num_experts))),
                          FILL_BLOCK=_ALIGN_BLOCK)
    _scatter_kernel[grid](flat, ranks, starts, sorted_ids, num_entries, BLOCK=_ALIGN_BLOCK)
    return sorted_ids, expert_ids, num_post


# The entry counts change with the batch: not specialized (on == 1 or % 16), so one binary serves them all.
@triton.jit(do_not_specialize=["num_padded", "num_entries"])
def _moe_gemm_kernel(a_ptr, b_ptr, c_ptr, weights_ptr, bias_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_ptr,
                     N, K, num_padded, num_entries, stride_am, stride_be, stride_bn, stride_cm, stride_bias_e,
                     TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """C[entry] = (A[entry // TOP_K] @ B[expert]^T + bias[expert]) (* weight[entry]) for the entries of
    one block."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(num_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_pid_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_pid_n)) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_post_ptr):  # past the real blocks: nothing to read
        return
    entries = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    entry_mask = entries < num_entries
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + (entries // TOP_K).to(tl.int64)[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + expert * stride_be + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        a = tl.load(a_ptrs, mask=entry_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_bias_e + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + entries, mask=entry_mask, other=0.0)[:, None]
    c_ptrs = c_ptr + entries.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=entry_mask[:, None] & n_mask[None, :])


def moe_gemm(a, b, bias, out, weights, sorted_ids, expert_ids, num_post, top_k, mul_weight, tiles,
             compile_only=False):
    """One grouped GEMM of `fused_moe_triton` (w13 or w2) over the aligned entries, with `tiles` as given:
    out[entry] = (a[entry // top_k] @ b[expert]^T + bias[expert]) (* weights[entry] if mul_weight).
    `compile_only`: Triton's warmup (compiles, launches nothing; meta tensors do), for the tuner."""
    block_m, block_n, block_k, group_m, num_warps, num_stages = tiles
    n, k = b.shape[1], b.shape[2]
    grid = (triton.cdiv(sorted_ids.numel(), block_m) * triton.cdiv(n, block_n),)
    kernel = functools.partial(_moe_gemm_kernel.warmup, grid=grid) if compile_only else _moe_gemm_kernel[grid]
    kernel(
        a, b, out, weights, out if bias is None else bias, sorted_ids, expert_ids, num_post, n, k,
        sorted_ids.numel(), out.shape[0], a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        0 if bias is None else bias.stride(0), TOP_K=top_k, MUL_WEIGHT=mul_weight, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", num_warps=num_warps,
        num_stages=num_stages)


@functools.cache
def moe_tiles(num_tokens, top_k, num_experts, intermediate, hidden_size, dtype, device):
    """A batch's tiles: on CUDA the tuned file's for this GPU and shape (`moe_tuned.py`) if there is one,
    else the MOE_CONFIGS row made concrete. Cached: a step pays one dict lookup, no file or table work."""
    if device.type == "cuda":
        tuned = tuned_tiles(num_tokens, num_experts, intermediate, cuda_device_name(device), dtype)
        if tuned is not None:
            return tuned
    return table_tiles(moe_config(num_tokens, top_k, num_experts), num_tokens, top_k, num_experts,
                       2 * intermediate, hidden_size, dtype)


def fused_moe_triton(hidden, w13, w2, router_logits, top_k, renormalize, config=None, *, w13_bias=None,
                     w2_bias=None, activation="silu", swiglu_alpha=1.702, swiglu_limit=7.0):
    """Triton version of `fused_moe_ref`. `config`: None (`moe_tiles` chooses; `quant_moe_tiles` for
    quantized experts), `MoeTiles` (used as given) or a MOE_CONFIGS row (made concrete for this batch as
    the table's rows are). w13 / w2 as tensors or both `QuantExperts` (dequantized inside the GEMMs)."""
    _check_activation(activation)
    num_tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    quantized = isinstance(w13, QuantExperts)
    assert quantized == isinstance(w2, QuantExperts), "both experts' GEMMs quantized, or neither"
    assert hidden.stride(1) == 1 and (quantized or (w13.stride(2) == 1 and w2.stride(2) == 1))
    gemm = moe_quant_gemm if quantized else moe_gemm
    if num_tokens == 0:
        return torch.empty_like(hidden)
    if num_experts <= _MAX_ROUTED_EXPERTS:
        weights, ids = select_experts_triton(router_logits, top_k, renormalize)
    else:
        weights, ids = select_experts(router_logits, top_k, renormalize)
    if config is None and quantized:  # the tuned files time the float kernel: the table's rows here
        tiles = quant_moe_tiles(num_tokens, top_k, num_experts, two_inter, hidden_size)
    elif config is None:
        tiles = moe_tiles(num_tokens, top_k, num_experts, w2.shape[2], hidden_size, hidden.dtype, hidden.device)
    elif isinstance(config, MoeTiles):
        tiles = config
    else:
        tiles = table_tiles(config, num_tokens, top_k, num_experts, two_inter, hidden_size, hidden.dtype)
    sorted_ids, expert_ids, num_post = moe_align_block_size_triton(ids, num_experts, tiles.w13.block_m)
    entries = num_tokens * top_k
    gate_up = torch.empty(entries, two_inter, dtype=hidden.dtype, device=hidden.device)
    gemm(hidden, w13, w13_bias, gate_up, weights, sorted_ids, expert_ids, num_post, top_k, False, tiles.w13)
    if activation == "swigluoai":
        activated = swiglu_oai_and_mul_triton(gate_up, swiglu_alpha, swiglu_limit)
    else:
        activated = silu_and_mul_triton(gate_up)
    down = torch.empty(entries, hidden_size, dtype=hidden.dtype, device=hidden.device)
    gemm(activated, w2, w2_bias, down, weights, sorted_ids, expert_ids, num_post, 1, True, tiles.w2)
    return down.view(num_tokens, top_k, hidden_size).sum(dim=1)


def fused_moe(hidden, w13, w2, router_logits, top_k, renormalize, **options):
    """Triton on CUDA, the torch reference elsewhere; `options` as `fused_moe_ref`'s keywords."""
    if use_triton(hidden):
        return fused_moe_triton(hidden, w13, w2, router_logits, top_k, renormalize, **options)
    return fused_moe_ref(hidden, w13, w2, router_logits, top_k, renormalize, **options)
