"""The gated delta rule, Gated DeltaNet's linear attention: a recurrent state S [Hv, Dk, Dv] per sequence,
decayed by exp(g) and corrected toward each token's value at rate beta (the delta rule):

    S_t = exp(g_t) S_{t-1} + k_t beta_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,      o_t = S_t^T q_t / sqrt(Dk)

with q and k L2-normalized per head, and each q/k head shared by Hv / Hk value heads. Two forms compute
it: the recurrent one, token by token (decode), and the chunked one (prefill), which solves the
corrections of a block of tokens at once (a triangular system, the WY/UT transform) so a block costs a
few matrix products. Both come as pure-torch references (CPU, tests) and, on CUDA, as
flash-linear-attention's Triton kernels (`fla-core`, the optional `hybrid` extra, imported lazily).
"""
from __future__ import annotations

import functools
import itertools

import torch
import torch.nn.functional as F

CHUNK_SIZE = 64


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, as flash-linear-attention computes it."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 as the kernels compute, fp64 when the tests give fp64."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _heads_first(q, k, v, g, beta):
    """[N, T, H*, D] inputs -> fp32 [N, Hv, T, D] (q/k heads repeated for their value heads,
    L2-normalized, q scaled by 1/sqrt(Dk)); g, beta [N, T, Hv] -> [N, Hv, T]."""
    group = v.shape[2] // k.shape[2]
    if group > 1:
        q, k = q.repeat_interleave(group, dim=2), k.repeat_interleave(group, dim=2)
    dtype = _compute_dtype(v)
    q, k, v, g, beta = (x.transpose(1, 2).to(dtype) for x in (q, k, v, g, beta))
    q, k = l2_normalize(q), l2_normalize(k)
    return q * q.shape[-1] ** -0.5, k, v, g, beta


def recurrent_gated_delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                   beta: torch.Tensor, initial_state: torch.Tensor):
    """q, k [N, T, Hk, Dk]; v [N, T, Hv, Dv]; g (log decay, <= 0), beta [N, T, Hv]; initial_state
    [N, Hv, Dk, Dv] -> (o [N, T, Hv, Dv] in v's dtype, final state [N, Hv, Dk, Dv] fp32), token by token."""
    q, k, v_, g, beta = _heads_first(q, k, v, g, beta)
    state = initial_state.to(v_.dtype).clone()
    out = torch.empty_like(v_)
    for t in range(q.shape[2]):
        state *= g[:, :, t].exp()[..., None, None]
        predicted = torch.einsum("nhkv,nhk->nhv", state, k[:, :, t])
        correction = (v_[:, :, t] - predicted) * beta[:, :, t, None]
        state += k[:, :, t, :, None] * correction[:, :, None, :]
        out[:, :, t] = torch.einsum("nhkv,nhk->nhv", state, q[:, :, t])
    return out.transpose(1, 2).to(v.dtype), state


def chunk_gated_delta_rule_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                               beta: torch.Tensor, initial_state: torch.Tensor, chunk_size: int = CHUNK_SIZE):
    """The same function as `recurrent_gated_delta_rule_ref`, in blocks of `chunk_size` tokens: within a
    block the delta-rule corrections solve one unit-lower-triangular system; blocks pass the state on."""
    q, k, v_, g, beta = _heads_first(q, k, v, g, beta)
    num_seqs, heads, length, _ = k.shape
    pad = -length % chunk_size
    q, k, v_ = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v_))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))  # padding: no decay, no update
    blocks = (length + pad) // chunk_size
    q, k, v_ = (x.reshape(num_seqs, heads, blocks, chunk_size, -1) for x in (q, k, v_))
    g = g.reshape(num_seqs, heads, blocks, chunk_size).cumsum(-1)  # log decay since the block's start
    beta = beta.reshape(num_seqs, heads, blocks, chunk_size, 1)
    later = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).triu(1)
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(later, float("-inf")).exp()  # [.., i, j]: j -> i
    # (I + strictly_lower(beta_i k_i.k_j decay_ij)) solves for the values the block writes ...
    system = ((k * beta) @ k.transpose(-1, -2)) * decay
    new_values = torch.linalg.solve_triangular(system, v_ * beta, upper=False, unitriangular=True)
    # ... and for what each of them must first read from the state carried into the block.
    state_keys = torch.linalg.solve_triangular(system, k * beta * g.exp()[..., None], upper=False,
                                               unitriangular=True)
    within = (q @ k.transpose(-1, -2)) * decay
    q_from_start = q * g.exp()[..., None]
    k_to_end = k * (g[..., -1:] - g).exp()[..., None]
    block_decay = g[..., -1].exp()[..., None, None]
    state = initial_state.to(v_.dtype).clone()
    out = torch.empty_like(v_)
    for block in range(blocks):
        written = new_values[:, :, block] - state_keys[:, :, block] @ state
        out[:, :, block] = q_from_start[:, :, block] @ state + within[:, :, block] @ written
        state = state * block_decay[:, :, block] + k_to_end[:, :, block].transpose(-1, -2) @ written
    out = out.reshape(num_seqs, heads, -1, v_.shape[-1])[:, :, :length]
    return out.transpose(1, 2).to(v.dtype), state


@functools.cache
def fla_ops():
    """flash-linear-attention's kernels, or None where fla-core is not installed."""
    try:
        from fla.ops.gated_delta_rule import (
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def _use_fla(x: torch.Tensor) -> bool:
    return x.is_cuda and fla_ops() is not None


def chunk_gated_delta_rule_varlen_ref(q, k, v, g, beta, initial_state, cu_seqlens):
    """Flat tokens of several sequences: q, k [T, Hk, Dk]; v [T, Hv, Dv]; g, beta [T, Hv]; initial_state
    [B, Hv, Dk, Dv]; cu_seqlens [B + 1] -> (o [T, Hv, Dv], final states [B, Hv, Dk, Dv] fp32)."""
    out = torch.empty_like(v)
    finals = []
    bounds = cu_seqlens.tolist()
    for index, (start, end) in enumerate(itertools.pairwise(bounds)):
        part = slice(start, end)
        o, final = chunk_gated_delta_rule_ref(q[None, part], k[None, part], v[None, part], g[None, part],
                                              beta[None, part], initial_state[index:index + 1])
        out[part] = o[0]
        finals.append(final)
    return out, torch.cat(finals)


def chunk_gated_delta_rule_varlen_fla(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_host=None):
    """`chunk_gated_delta_rule_varlen_ref` through fla-core's chunked Triton kernel. `cu_seqlens_host` (int64,
    CPU; with `cu_seqlens` int64 too): fla builds its chunk indices on the host, without a device sync, and
    reuses them while the same tensors come back (the next layers of the step)."""
    chunk, _ = fla_ops()
    o, final = chunk(q[None], k[None], v[None], g=g[None], beta=beta[None], initial_state=initial_state,
                     output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens.long(),
                     cu_seqlens_cpu=cu_seqlens_host)
    return o[0], final


def chunk_gated_delta_rule_varlen(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_host=None):
    """fla-core's kernel on CUDA (when installed), the torch reference elsewhere."""
    if _use_fla(q):
        return chunk_gated_delta_rule_varlen_fla(q, k, v, g, beta, initial_state, cu_seqlens, cu_seqlens_host)
    return chunk_gated_delta_rule_varlen_ref(q, k, v, g, beta, initial_state, cu_seqlens)


def recurrent_gated_delta_rule_step_fla(q, k, v, g, beta, initial_state):
    """One token per sequence (q, k [N, Hk, Dk]; v [N, Hv, Dv]; g, beta [N, Hv]; initial_state
    [N, Hv, Dk, Dv]) through fla-core's fused recurrent kernel: no host sync, CUDA-graph capturable.
    By keyword: the kernel's fifth and sixth positions are per-key and per-value decays (gk, gv), not beta."""
    _, recurrent = fla_ops()
    o, final = recurrent(q[:, None], k[:, None], v[:, None], g=g[:, None], beta=beta[:, None],
                         initial_state=initial_state, output_final_state=True, use_qk_l2norm_in_kernel=True)
    return o[:, 0], final


def recurrent_gated_delta_rule_step_ref(q, k, v, g, beta, initial_state):
    o, final = recurrent_gated_delta_rule_ref(q[:, None], k[:, None], v[:, None], g[:, None], beta[:, None],
                                              initial_state)
    return o[:, 0], final


def recurrent_gated_delta_rule_step(q, k, v, g, beta, initial_state):
    """One decode token per sequence: fla-core's kernel on CUDA (when installed), the reference elsewhere."""
    run = recurrent_gated_delta_rule_step_fla if _use_fla(q) else recurrent_gated_delta_rule_step_ref
    return run(q, k, v, g, beta, initial_state)
