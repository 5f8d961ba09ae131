"""flash-linear-attention's kernels (fla-core, the `hybrid` extra) against our torch references at the real
layer shapes of Qwen3-Next-80B-A3B and Qwen3.5-27B: the chunked varlen form from per-sequence states over
awkward lengths, the one-token recurrent form, and the short convolution's varlen and update forms; the
decode forms captured in a CUDA graph as the decode graphs capture them (gather by slot, scatter back)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from asyncserve.kernels.causal_conv1d import (
    causal_conv1d_update_fla,
    causal_conv1d_update_ref,
    causal_conv1d_varlen_fla,
    causal_conv1d_varlen_ref,
    fla_conv_ops,
)
from asyncserve.kernels.gated_delta_rule import (
    chunk_gated_delta_rule_varlen_fla,
    chunk_gated_delta_rule_varlen_ref,
    fla_ops,
    recurrent_gated_delta_rule_step_fla,
    recurrent_gated_delta_rule_step_ref,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# name -> (key heads, value heads, key dim, value dim)
SHAPES = {"qwen3-next-80b-a3b": (16, 32, 128, 128), "qwen3.5-27b": (16, 48, 128, 128)}
LENGTHS = [1, 63, 200, 64, 129, 5]
WIDTH = 4


@pytest.fixture(autouse=True)
def _needs_fla():
    if fla_ops() is None or fla_conv_ops() is None:
        pytest.fail("fla-core is not installed: pip install -e '.[hybrid]' on the GPU machine")


def _relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float((out.float() - expected.float()).norm() / expected.float().norm())


def _rule_inputs(num_tokens: int, shape, num_seqs: int, seed: int = 0):
    k_heads, v_heads, k_dim, v_dim = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=gen, device="cuda")

    q = randn(num_tokens, k_heads, k_dim).bfloat16()
    k = randn(num_tokens, k_heads, k_dim).bfloat16()
    v = randn(num_tokens, v_heads, v_dim).bfloat16()
    g = -F.softplus(randn(num_tokens, v_heads))  # fp32 log decays, as the layer computes them
    beta = randn(num_tokens, v_heads).sigmoid().bfloat16()
    states = randn(num_seqs, v_heads, k_dim, v_dim) * 0.1
    return q, k, v, g, beta, states


@pytest.mark.parametrize("name", list(SHAPES))
def test_chunked_varlen_matches_the_reference(name):
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v, g, beta, states = _rule_inputs(sum(LENGTHS), SHAPES[name], len(LENGTHS))
    out, final = chunk_gated_delta_rule_varlen_fla(q, k, v, g, beta, states.clone(), cu_seqlens)
    expected, expected_final = chunk_gated_delta_rule_varlen_ref(q.float(), k.float(), v.float(), g, beta.float(),
                                                                 states, cu_seqlens)
    assert _relative_error(out, expected) < 2e-2
    assert _relative_error(final, expected_final) < 2e-2


@pytest.mark.parametrize("name", list(SHAPES))
def test_recurrent_step_matches_the_reference_and_replays_in_a_cuda_graph(name):
    num_seqs, num_slots = 8, 12
    q, k, v, g, beta, _ = _rule_inputs(num_seqs, SHAPES[name], num_seqs, seed=1)
    pool = torch.randn(num_slots + 1, *SHAPES[name][1:2], SHAPES[name][2], SHAPES[name][3], device="cuda") * 0.1
    slots = torch.tensor([3, 0, 11, 7, 5, 1, 9, 12], device="cuda")
    expected, expected_final = recurrent_gated_delta_rule_step_ref(q.float(), k.float(), v.float(), g,
                                                                   beta.float(), pool[slots])
    start = pool.clone()

    def step():
        out, final = recurrent_gated_delta_rule_step_fla(q, k, v, g, beta, pool[slots])
        pool.index_copy_(0, slots, final.to(pool.dtype))
        return out

    step()  # compiles (and autotunes) outside the capture
    pool.copy_(start)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    pool.copy_(start)
    graph.replay()
    torch.cuda.synchronize()
    assert _relative_error(out, expected) < 2e-2
    assert _relative_error(pool[slots], expected_final) < 2e-2
    untouched = torch.ones(num_slots + 1, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert torch.equal(pool[untouched], start[untouched])


def test_short_convolution_matches_the_reference_at_qwen3_next_width():
    channels = 2 * 16 * 128 + 32 * 128  # q|k|v of Qwen3-Next's DeltaNet layers
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(sum(LENGTHS), channels, generator=gen, device="cuda").bfloat16()
    weight = (torch.randn(channels, WIDTH, generator=gen, device="cuda") * 0.5).bfloat16()
    states = torch.randn(len(LENGTHS), channels, WIDTH, generator=gen, device="cuda").bfloat16()
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    out, final = causal_conv1d_varlen_fla(x, weight, states.clone(), cu_seqlens)
    expected, expected_final = causal_conv1d_varlen_ref(x.float(), weight.float(), states.float(), cu_seqlens)
    assert _relative_error(out, expected) < 1e-2
    torch.testing.assert_close(final.float(), expected_final)  # the stored inputs, exactly
    decode = x[:8]
    stepped, new_state = causal_conv1d_update_fla(decode, weight, states[:1].expand(8, -1, -1).contiguous())
    expected_step, expected_state = causal_conv1d_update_ref(decode.float(), weight.float(),
                                                             states[:1].expand(8, -1, -1).float())
    assert _relative_error(stepped, expected_step) < 1e-2
    torch.testing.assert_close(new_state.float(), expected_state)
